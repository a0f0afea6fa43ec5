"""The shipped weights load on CPU and do real work on a held-out synthetic image (seed 3)."""
import numpy as np
import pytest
import torch

from models.checkpoint import default_weights, load_checkpoint


@pytest.fixture(scope="module")
def still():
    from models.data_synthetic import sim_params
    from stream.synthetic import render_still
    return render_still(sim_params(3))  # evaluation range 0-999: never trained on


@pytest.mark.parametrize("kind", ["seg", "keypoints", "classifier"])
def test_shipped_weights_have_metadata(kind):
    ck = load_checkpoint(default_weights(kind), kind)
    m = ck.meta
    for key in ("arch", "training_data", "seeds", "git_sha", "metrics", "date", "normalization"):
        assert key in m, key
    assert default_weights(kind).stat().st_size < 5_000_000
    assert min(m["training_data"]["train_seeds"]) >= 10_000


def test_shipped_unet_segments_held_out_image(still):
    from models import metrics as M
    from models.segmenter import get_segmenter
    torch.set_num_threads(2)
    img, _, lab = still
    seg = get_segmenter("unet", "eager")
    pred = seg.segment(img)
    assert pred.shape == img.shape[:2] and pred.dtype == np.uint8 and pred.max() <= 3
    fp, ft = np.isin(pred, (1, 2)), np.isin(lab, (1, 2))
    # clear capillaries are found; out-of-focus background rows (label 2) are partly missed (known)
    assert M.sensitivity(fp, lab == 1) > 0.8 and M.sensitivity(fp, ft) > 0.5 and M.precision(fp, ft) > 0.6
    gray = seg.segment(np.ascontiguousarray(img[:300, :500, 1]))  # gray input, other size
    assert gray.shape == (300, 500)
    assert type(get_segmenter("auto", "auto")).__name__ == "UNetSegmenter"


def test_shipped_classifier_and_keypoints_run(still):
    from models.classifier import CLASS_NAMES, Classifier, classifier_crop
    from models.data_synthetic import loop_center
    from models.keypoints import KeypointModel
    img, truth, _ = still
    caps = [c for c in truth["capillaries"] if c["row"] == "distal" and c["in_view"]
            and 0 < c["apex_px"][0] < img.shape[1] and 0 < c["apex_px"][1] < img.shape[0]][:6]
    centers = [loop_center(c) for c in caps]
    out = Classifier("eager").predict([classifier_crop(img, c) for c in centers])
    assert len(out) == len(caps) and all(n in CLASS_NAMES and 0 <= p <= 1 for n, p in out)
    res = KeypointModel("eager").predict(img, centers)
    assert len(res) == len(caps)
    d = [np.hypot(r["points"]["up"][0] - c["keypoints"]["up"][0], r["points"]["up"][1] - c["keypoints"]["up"][1])
         for r, c in zip(res, caps) if "up" in r["points"]]
    assert len(d) >= len(caps) // 2 and np.median(d) < 6.0


def test_apex_near_the_window_edge_is_looked_at_again(still, monkeypatch):
    """A loop centre given well below the loop's middle (a long loop, or a loose instance box)
    puts the apex near the top edge of the keypoint window; the second, recentred look finds it."""
    import models.keypoints as K
    from models.data_synthetic import loop_center
    img, truth, _ = still
    caps = [c for c in truth["capillaries"] if c["row"] == "distal" and c["in_view"] and c["class"] == "normal"
            and 20 < c["keypoints"]["up"][0] < img.shape[1] - 20 and c["keypoints"]["up"][1] > 20]
    assert len(caps) >= 8
    # this image is 1024 px wide (canonical factor 1): window ±128 px, apex 110-135 px above the centre
    centers = [(loop_center(c)[0], loop_center(c)[1] + 50.0) for c in caps]

    def found():
        res = K.KeypointModel("eager").predict(img, centers)
        d = [np.hypot(*(np.subtract(r["points"]["up"], c["keypoints"]["up"]))) if "up" in r["points"] else np.inf
             for r, c in zip(res, caps)]
        return float(np.mean(np.array(d) <= 5.0))

    with_second_look = found()
    monkeypatch.setattr(K, "APEX_EDGE_MARGIN", -1e9)  # never look again
    first_look_only = found()
    assert with_second_look >= 0.75 and with_second_look > first_look_only + 0.1


def test_pinned_threads_give_the_same_bits_whatever_the_host_sets():
    """Crop models run on a pinned thread count: the same outputs with 1 or 2 host threads (batch
    workers vs the CLI), and the caller's thread count is restored."""
    from models.backends import load_model
    m = load_model("keypoints", "eager", threads=1)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 1, 96, 96)).astype(np.float32))
    prev = torch.get_num_threads()
    outs = []
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            outs.append(m.run(x)[0])
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1])
