"""ANFC labelme loader: masks, point grouping, subject-wise splits, errors, and a train smoke run."""
import json

import cv2
import numpy as np
import pytest

from models.data_anfc import AnfcDataset, parse_labelme, subject_of
from nailfold.errors import InputError


def _write(tmp, stem, w=256, h=192, extra_shapes=()):
    img = np.full((h, w, 3), 200, np.uint8)
    cv2.rectangle(img, (40, 40), (60, 150), (120, 60, 150), -1)
    cv2.imwrite(str(tmp / f"{stem}.jpg"), img)
    shapes = [
        {"label": "normal", "points": [[40, 40], [60, 40], [60, 150], [40, 150]], "shape_type": "polygon", "group_id": 1},
        {"label": "blur", "points": [[100, 20], [120, 20], [120, 60], [100, 60]], "shape_type": "polygon", "group_id": None},
        {"label": "hemo", "points": [[150, 100], [170, 100], [170, 120], [150, 120]], "shape_type": "polygon", "group_id": None},
        {"label": "aggregation", "points": [[200, 150], [220, 150], [220, 170], [200, 170]], "shape_type": "polygon", "group_id": None},
        {"label": "up", "points": [[50, 38]], "shape_type": "point", "group_id": 1},
        {"label": "down", "points": [[50, 45]], "shape_type": "point", "group_id": 1},
        {"label": "left-left", "points": [[40, 100]], "shape_type": "point", "group_id": 1},
        {"label": "left-right", "points": [[45, 100]], "shape_type": "point", "group_id": 1},
        {"label": "up", "points": [[110, 18]], "shape_type": "point", "group_id": 2},
        {"label": "conj-1", "points": [[52, 120]], "shape_type": "point", "group_id": 1},
        *extra_shapes,
    ]
    (tmp / f"{stem}.json").write_text(json.dumps({"shapes": shapes, "imagePath": f"{stem}.jpg"}))


def test_masks_and_grouping(tmp_path):
    _write(tmp_path, "S1_1")
    mask, loops, cross = parse_labelme(tmp_path / "S1_1.json", (192, 256))
    assert mask.dtype == np.uint8 and mask.shape == (192, 256)
    assert mask[100, 50] == 1 and mask[40, 110] == 2 and mask[110, 160] == 3 and mask[160, 210] == 1
    assert mask[5, 5] == 0
    assert set(loops) == {1, 2}
    assert loops[1]["up"] == (50.0, 38.0) and loops[1]["left-right"] == (45.0, 100.0)
    assert loops[2] == {"up": (110.0, 18.0)}
    assert cross == {1: [(52.0, 120.0)]}


def test_subject_wise_splits(tmp_path):
    for s in range(8):
        for p in range(3):
            _write(tmp_path, f"Subj{s}_{p}")
    ds = AnfcDataset(tmp_path, seed=3)
    splits = {n: ds.split(n) for n in ("train", "val", "test")}
    assert sum(len(v) for v in splits.values()) == 24
    subj = {n: {r.subject for r in v} for n, v in splits.items()}
    assert all(subj[n] for n in subj)
    assert not (subj["train"] & subj["val"]) and not (subj["train"] & subj["test"]) and not (subj["val"] & subj["test"])
    assert AnfcDataset(tmp_path, seed=3).subject_split == ds.subject_split  # deterministic
    assert subject_of("Subj12_3") == "Subj12" and subject_of("a_b_7") == "a_b"


def test_errors(tmp_path):
    with pytest.raises(InputError):
        AnfcDataset(tmp_path / "missing")
    with pytest.raises(InputError):
        AnfcDataset(tmp_path)  # empty
    (tmp_path / "S1_1.jpg").write_bytes(cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))[1].tobytes())
    (tmp_path / "S1_1.json").write_text("{not json")
    with pytest.raises(InputError, match="S1_1.json"):
        AnfcDataset(tmp_path).read(AnfcDataset(tmp_path).records[0])


def test_train_seg_on_anfc_smoke(tmp_path):
    from nailfold.cli import main
    data = tmp_path / "anfc"
    data.mkdir()
    for s in range(3):
        _write(data, f"P{s}_1")
    out = tmp_path / "seg.pt"
    rc = main(["train", "seg", "--data", f"anfc:{data}", "--epochs", "1", "--steps", "2", "--batch-size", "2",
               "--crop", "64", "--base", "4", "--out", str(out)])
    assert rc == 0 and out.is_file()
    from models.checkpoint import load_checkpoint
    ck = load_checkpoint(out, "seg")
    assert ck.meta["training_data"]["source"].startswith("anfc:")
    assert set(ck.meta["training_data"]["train_subjects"]).isdisjoint(ck.meta["training_data"]["val_subjects"])
    from models.segmenter import get_segmenter
    seg = get_segmenter("unet", "eager", weights=out)
    lab = seg.segment(cv2.imread(str(data / "P0_1.jpg")))
    assert lab.shape == (192, 256) and lab.dtype == np.uint8 and lab.max() <= 3


def test_a_16_bit_dataset_image_reads_as_its_8_bit_self(tmp_path):
    # a dataset exported from microscopy software as 12-bit data in 16-bit PNGs: read at its depth
    # (cv2.imread kept the top byte: a sixteenth of the brightness)
    _write(tmp_path, "S1_1")
    img8 = cv2.imread(str(tmp_path / "S1_1.jpg"), cv2.IMREAD_COLOR)
    (tmp_path / "S1_1.jpg").unlink()
    cv2.imwrite(str(tmp_path / "S1_1.png"), img8.astype(np.uint16) * 16)
    ds = AnfcDataset(tmp_path)
    s = ds.read(ds.records[0])
    assert s.image.dtype == np.uint8 and np.abs(s.image.astype(int) - img8).max() <= 1
    (tmp_path / "S1_1.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image"):
        ds.read(ds.records[0])
