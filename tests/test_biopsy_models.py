"""Shipped weights, analyze_image / render_overlay, CLI report, checkpoint errors, training smoke."""
import argparse
import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from nailfold.errors import InputError, NailfoldError

from biopsy import cli as bcli
from biopsy.analyze import BLUE, GREEN, RED, BiopsyResult, analyze_image, load_models, render_overlay
from biopsy.metrics import tolerant_dice
from biopsy.nets import load_checkpoint
from biopsy.synthetic import generate
from biopsy.train import train


@pytest.fixture(scope="module")
def models():
    return load_models()


@pytest.fixture(scope="module")
def sample():
    return generate(1_000_777, (480, 640), n_crossings=6)  # held-out seed range


@pytest.fixture(scope="module")
def full_sample():
    # the dermis network is trained on whole 1600×1200 fields (it needs the slide → epidermis →
    # dermis context), so its accuracy is checked at that size; first held-out seed ≥ 1_000_777
    # with the base appearance (the "wide" styles are measured by `nailfold evaluate biopsy`)
    s = generate(1_000_780, (1200, 1600), n_crossings=10)
    assert not s.params["wide_style"]
    return s


def test_shipped_weights_detect_nerves_and_crossings(models, full_sample):
    sample = full_sample
    r = analyze_image(sample.image, weights=models, um_per_px=0.5)
    assert isinstance(r, BiopsyResult) and r.shape == (1200, 1600)
    assert tolerant_dice(r.nerves, sample.nerves, 3) > 0.8
    assert (r.dermis == sample.dermis).mean() > 0.95
    assert abs(r.crossing_count - sample.crossing_count) <= 2
    assert r.boundary_length_px > 500
    assert r.boundary_length_mm == pytest.approx(r.boundary_length_px * 0.5 / 1000)
    assert r.crossings_per_mm == pytest.approx(r.crossing_count / r.boundary_length_mm)


def test_overlay_colours(models, sample):
    r = analyze_image(sample.image, weights=models)
    ov = render_overlay(sample.image, r)
    assert ov.shape == sample.image.shape and ov.dtype == np.uint8
    assert r.crossing_count > 0 and (ov == RED).all(axis=2).sum() > 20 * r.crossing_count
    plain = render_overlay(sample.image, dataclasses.replace(r, crossings=np.zeros((0, 2))))
    assert (plain[r.boundary] == GREEN).all()
    assert (plain[r.nerves & ~r.boundary] == BLUE).all()
    assert np.array_equal(plain[~(r.nerves | r.boundary)], sample.image[~(r.nerves | r.boundary)])


def test_bad_inputs_raise_input_error(models):
    with pytest.raises(InputError):
        analyze_image(np.zeros((10, 10, 3), np.uint8), weights=models)
    with pytest.raises(InputError):
        analyze_image(np.zeros((64, 64, 3), np.float64), weights=models)
    with pytest.raises(InputError):
        analyze_image(np.zeros((64, 64, 3), np.uint8), weights=models, um_per_px=-1)


def test_missing_or_corrupt_checkpoint_is_an_error(tmp_path):
    with pytest.raises(NailfoldError, match="not found"):
        load_checkpoint(tmp_path / "hed.pt", "hed")
    (tmp_path / "hed.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(NailfoldError, match="unreadable"):
        load_checkpoint(tmp_path / "hed.pt", "hed")
    with pytest.raises(NailfoldError):
        load_models(tmp_path)


def test_cli_report_schema_and_atomicity(tmp_path, sample):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), sample.image)
    out = tmp_path / "r" / "report.json"
    ns = argparse.Namespace(images=[str(img)], out=str(out), overlay=str(tmp_path / "ov"), um_per_px=None,
                            weights=None)
    assert bcli.run(ns) == 0
    rep = json.loads(out.read_text())
    assert rep["schema"] == "nailfold.biopsy-report/1"
    rec = rep["images"][0]
    assert rec["shape"] == [480, 640] and rec["crossing_count"] == len(rec["crossings"])
    assert rec["boundary_length_mm"] is None and rec["crossings_per_mm"] is None and rec["uncalibrated_reason"]
    assert (tmp_path / "ov" / "a.overlay.png").is_file()
    # calibrated
    ns.um_per_px = 0.4
    bcli.run(ns)
    rec = json.loads(out.read_text())["images"][0]
    assert rec["boundary_length_mm"] == pytest.approx(rec["boundary_length_px"] * 0.4 / 1000, rel=1e-3)
    # a bad image → InputError, nothing written
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    out2 = tmp_path / "r2.json"
    ns2 = argparse.Namespace(images=[str(img), str(bad)], out=str(out2), overlay=str(tmp_path / "ov2"),
                             um_per_px=None, weights=None)
    with pytest.raises(InputError):
        bcli.run(ns2)
    assert not out2.exists() and not (tmp_path / "ov2").exists()


@pytest.mark.parametrize("what", ["hed", "dermis"])
def test_training_smoke(tmp_path, what, monkeypatch):
    from biopsy import train as T
    monkeypatch.setitem(T.DEFAULTS, what, {**T.DEFAULTS[what], "pool": 2, "shape": (160, 200), "crop": 96})
    out = tmp_path / f"{what}.pt"
    ns = argparse.Namespace(data="synthetic", steps=3, batch_size=2, lr=None, out=str(out), seed=1, epochs=None,
                            workers=None)
    assert train(what, ns) == 0
    model, extra = load_checkpoint(out, what)
    assert extra["steps"] == 3


def test_weight_averaged_training_saves_the_mean_of_the_last_snapshots(tmp_path, monkeypatch):
    """``--swa K --schedule cosine``: the checkpoint is the element-wise mean of the model at the
    last K validation points (a 60-step run validates every 10 steps: K = 3 → steps 40, 50, 60)."""
    from biopsy import train as T
    monkeypatch.setitem(T.DEFAULTS, "dermis", {**T.DEFAULTS["dermis"], "pool": 2, "shape": (160, 200), "crop": 32})
    seen = []
    real_val = T._val_dermis

    def spy(model, val):   # record the weights at every validation point
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_val(model, val)

    monkeypatch.setattr(T, "_val_dermis", spy)
    out = tmp_path / "d.pt"
    ns = argparse.Namespace(data="synthetic", steps=60, batch_size=1, lr=1e-2, out=str(out), seed=2, epochs=None,
                            workers=None, pool=None, schedule="cosine", swa=3)
    assert train("dermis", ns) == 0
    model, extra = load_checkpoint(out, "dermis")
    assert extra["swa_steps"] == [40, 50, 60] and extra["schedule"] == "cosine"
    key = "head.weight"
    want = torch.stack([sd[key] for sd in seen[-4:-1]]).mean(0)   # the last call validates the average
    assert not torch.equal(seen[-4][key], seen[-2][key])          # the snapshots differ ...
    assert torch.allclose(model.state_dict()[key], want, atol=1e-6)   # ... and the mean is saved


def test_photometric_keeps_shape_and_changes_appearance():
    from biopsy.augment import photometric
    img = generate(1_000_779, (96, 128)).image
    outs = [photometric(img, np.random.default_rng(k)) for k in range(4)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    assert any(np.abs(o.astype(int) - img).mean() > 3 for o in outs)


def test_dermisnet_image_norm_is_gain_invariant():
    import torch
    from biopsy.nets import DermisNet
    torch.manual_seed(0)
    net = DermisNet(decoder=True, input_norm="image").eval()
    x = torch.rand(1, 3, 64, 80) * 0.5 + 0.3
    with torch.no_grad():
        assert torch.allclose(net(x), net(x * 0.6 + 0.1), atol=1e-2)
    with pytest.raises(ValueError):
        DermisNet(input_norm="nope")


def test_skeleton_recall_loss_weighs_fibres_by_length_not_area():
    """A missed 1-px fibre costs as much of the skeleton recall as a missed 5-px fibre of the same
    length (Dice charges it a fifth); an empty skeleton gives 0, perfect recall ≈ 0."""
    import torch

    from biopsy.train import dice_loss, skeleton_recall_loss, skeleton_tube
    m = np.zeros((64, 96), bool)
    m[10:54, 20] = True                 # thin fibre
    m[10:54, 60:65] = True              # thick fibre
    tube = skeleton_tube(m)
    assert tube[30, 19:22].all() and tube[30, 61:64].all() and not tube[30, 60 - 2]
    t = torch.from_numpy(tube.astype(np.float32))[None, None]
    y = torch.from_numpy(m.astype(np.float32))[None, None]

    def logits(mask):
        return torch.from_numpy(np.where(mask, 20.0, -20.0).astype(np.float32))[None, None]
    full = m | tube                     # a prediction that covers every fibre and its tube
    miss_thin, miss_thick = full.copy(), full.copy()
    miss_thin[:, 15:26] = False
    miss_thick[:, 55:70] = False
    sr_thin, sr_thick = float(skeleton_recall_loss(logits(miss_thin), t)), float(skeleton_recall_loss(logits(miss_thick), t))
    assert abs(sr_thin - sr_thick) < 0.1 and sr_thin > 0.3
    assert float(dice_loss(logits(miss_thin), y)) < 0.5 * float(dice_loss(logits(miss_thick), y))
    assert float(skeleton_recall_loss(logits(full), t)) < 1e-3
    assert float(skeleton_recall_loss(logits(m), torch.zeros_like(t))) == 0.0


def test_hed_training_smoke_with_the_skeleton_term(tmp_path, monkeypatch):
    from biopsy import train as T
    monkeypatch.setitem(T.DEFAULTS, "hed", {**T.DEFAULTS["hed"], "pool": 2, "shape": (160, 200), "crop": 96})
    out = tmp_path / "hed.pt"
    ns = argparse.Namespace(data="synthetic", steps=2, batch_size=2, lr=None, out=str(out), seed=1, epochs=None,
                            workers=None, skeleton_weight=1.0)
    assert train("hed", ns) == 0 and out.exists()


def test_train_cli_keeps_each_networks_own_schedule_defaults(monkeypatch):
    """``nailfold train hed`` without ``--steps/--lr/--batch-size`` trains with ``biopsy.train.DEFAULTS``
    (the capillaroscopy nets' per-epoch defaults must not leak into the biopsy run), and the
    capillaroscopy nets still get theirs."""
    from biopsy import train as T
    from models import train_cli

    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    seen = {}
    monkeypatch.setattr(T, "train", lambda what, args: seen.update(what=what, args=args) or 0)
    assert train_cli.run(p.parse_args(["hed"])) == 0
    a = seen["args"]
    assert a.steps is None and a.lr is None and a.batch_size is None and a.epochs is None
    monkeypatch.setattr(train_cli, "train_seg", lambda args: seen.update(seg=args) or 0)
    assert train_cli.run(p.parse_args(["seg", "--steps", "7"])) == 0
    s = seen["seg"]
    assert (s.epochs, s.steps, s.batch_size, s.lr) == (10, 7, 8, 2e-3)
