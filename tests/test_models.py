"""Architectures, losses, metrics, checkpoints, backends and training smoke tests (tiny tensors)."""
import argparse

import numpy as np
import pytest
import torch

from models import augment as A
from models import metrics as M
from models.backends import load_model, tensorrt_status
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.classifier import CapillaryResNet
from models.keypoints import KeypointNet, decode_heatmap, refine_pair
from models.losses import dice_ce_loss, heatmap_loss
from models.unet import UNet, n_params


def test_architectures_shapes_and_sizes():
    u = UNet(base=16).eval()
    assert 2e5 < n_params(u) < 2e6
    assert u(torch.zeros(1, 1, 64, 96)).shape == (1, 4, 64, 96)
    k = KeypointNet(base=16).eval()
    with torch.no_grad():
        h, s = k(torch.zeros(2, 1, 96, 96))
    assert h.shape == (2, 9, 96, 96) and s.shape == (2, 1)
    from models.keypoints import heatmap_probs
    p = heatmap_probs(h)
    assert torch.allclose(p[:, :8].sum((2, 3)), torch.ones(2, 8), atol=1e-4) and float(p[:, 8].max()) <= 1
    c = CapillaryResNet().eval()
    assert c(torch.zeros(3, 1, 64, 64)).shape == (3, 7)
    assert n_params(k) < 2e6 and n_params(c) < 2e6


def test_losses_prefer_correct_predictions():
    y = torch.zeros(1, 16, 16, dtype=torch.long)
    y[0, 4:8, 4:12] = 1
    good = torch.nn.functional.one_hot(y, 4).permute(0, 3, 1, 2).float() * 10
    bad = torch.zeros_like(good)
    assert dice_ce_loss(good, y) < dice_ce_loss(bad, y)
    t = torch.zeros(1, 1, 8, 8)
    t[0, 0, 4, 4] = 1
    assert heatmap_loss(t, t) == 0 and heatmap_loss(torch.zeros_like(t), t) > 0


def test_metrics():
    t = np.zeros((40, 40), bool)
    t[10:30, 10:20] = True
    assert M.sensitivity(t, t) == 1 and M.dice(t, t) == 1 and M.tolerant_dice(t, t, 1) == 1
    shifted = np.roll(t, 2, axis=1)
    assert M.tolerant_dice(shifted, t, 1) < M.tolerant_dice(shifted, t, 3) == 1.0
    assert M.dice(shifted, t) == pytest.approx(0.8)
    assert M.tolerant_dice(np.zeros_like(t), t, 3) == 0
    m = M.match_points([[0, 0], [10, 10]], [[11, 10], [0.5, 0]], 2)
    assert sorted((i, j) for i, j, _ in m) == [(0, 1), (1, 0)]
    assert M.confusion([0, 1, 1], [0, 1, 0], 2).tolist() == [[1, 0], [1, 1]]


def test_standardize_is_contrast_invariant():
    rng = np.random.default_rng(0)
    g = rng.integers(50, 200, (64, 64)).astype(np.uint8)
    a = A.standardize(g)
    b = A.standardize((g.astype(np.float32) * 0.5 + 20).astype(np.uint8))
    assert abs(float(np.median(a))) < 0.1 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    assert A.seg_size((768, 1024)) == (384, 512) and A.seg_size((1500, 2000)) == (384, 512)


def test_subpixel_decoding_and_pair_refinement():
    yy, xx = np.mgrid[0:48, 0:48]
    h = np.exp(-((xx - 20.3) ** 2 + (yy - 30.6) ** 2) / (2 * 1.5 ** 2))
    x, y, pk = decode_heatmap(h)
    assert abs(x - 20.3) < 0.15 and abs(y - 30.6) < 0.15 and pk > 0.9
    # a vertical cylinder of diameter 9 px centred at x = 40.3 (Beer-Lambert chord length)
    img = np.full((60, 80), 200.0)
    xs = np.arange(80)[None, :] + 0.0
    sub = np.linspace(-0.45, 0.45, 10)
    chord = np.mean([2 * np.sqrt(np.clip(4.5 ** 2 - (xs + s - 40.3) ** 2, 0, None)) for s in sub], axis=0)
    img = img * np.exp(-0.08 * chord) * np.ones((60, 1))
    p1, p2 = refine_pair(img.astype(np.float32), (37.0, 30.0), (44.5, 30.0))
    assert abs(np.hypot(*(p2 - p1)) - 9.0) < 0.3 and abs((p1[0] + p2[0]) / 2 - 40.3) < 0.2


def _ckpt(tmp_path, kind="seg"):
    m = UNet(base=4)
    return save_checkpoint(tmp_path / f"{kind}.pt", m, {"kind": kind, "arch": {"base": 4},
                                                        "classes": ["bg", "cap", "blur", "hemo"]}), m


def test_checkpoint_roundtrip_and_errors(tmp_path):
    p, m = _ckpt(tmp_path)
    ck = load_checkpoint(p, "seg")
    assert ck.meta["git_sha"] and ck.meta["date"] and ck.meta["classes"][1] == "cap"
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="expected 'keypoints'"):
        load_checkpoint(p, "keypoints")
    torch.save({"format": "nailfold.checkpoint/1", "meta": {"kind": "seg", "arch": {"base": 8}},
                "state_dict": m.state_dict()}, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="does not match"):
        load_model("seg", "eager", tmp_path / "mismatch.pt")


def test_backends_eager_and_auto_fallback(tmp_path, caplog):
    p, m = _ckpt(tmp_path)
    x = torch.randn(1, 1, 32, 48)
    lm = load_model("unet", "eager", p)
    ref = m.eval()(x)
    assert lm.backend == "eager" and torch.allclose(lm.run(x), ref, atol=1e-5)
    if not torch.cuda.is_available():
        assert load_model("seg", "auto", p).backend == "eager"
        with caplog.at_level("WARNING"):
            assert load_model("seg", "tensorrt", p).backend == "eager"
        assert "unavailable" in caplog.text
    with pytest.raises(CheckpointError):
        load_model("seg", "bogus", p)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensorrt_backend(tmp_path):
    ok, why = tensorrt_status()
    if not ok:
        pytest.skip(why)
    p, m = _ckpt(tmp_path)
    lm = load_model("seg", "tensorrt", p)
    x = torch.randn(1, 1, 64, 64)
    assert lm.backend == "tensorrt"
    out = lm.run(x)
    ref = m.eval()(x)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=5e-2)


def test_unet_segmenter_missing_weights_is_clear_error(tmp_path, caplog):
    from models.segmenter import get_segmenter
    with pytest.raises(CheckpointError, match="not found"):
        get_segmenter("unet", "eager", weights=tmp_path / "missing.pt")
    with caplog.at_level("WARNING"):
        s = get_segmenter("auto", "eager", weights=tmp_path / "missing.pt")
    assert type(s).__name__ == "ClassicalSegmenter" and "classical" in caplog.text


def test_keypoint_and_classifier_training_smoke(tmp_path, monkeypatch):
    """One optimizer step each on hand-made loop windows (no rendering): checkpoints come out."""
    from models import classifier, keypoints
    from models.data_synthetic import LoopSample
    rng = np.random.default_rng(1)
    samples = []
    for i, cls in enumerate(classifier.CLASS_NAMES):
        crop = rng.integers(100, 200, (144, 144, 3)).astype(np.uint8)
        pts = {n: (50.0 + j * 5, 40.0 + j * 5) for j, n in enumerate(keypoints.POINT_NAMES)}
        samples.append(LoopSample(crop, cls, pts, [(70.0, 80.0)], "left" if i % 2 else "right"))
    monkeypatch.setattr(keypoints, "load_or_render_loops", lambda a: (samples, samples, {"source": "test"}))
    args = argparse.Namespace(seed=0, epochs=1, steps=1, batch_size=4, lr=1e-3, base=4, data="synthetic",
                              out=str(tmp_path / "kp.pt"))
    assert keypoints.train(args) == 0
    km = keypoints.KeypointModel("eager", tmp_path / "kp.pt")
    img = rng.integers(0, 255, (200, 300, 3)).astype(np.uint8)
    res = km.predict(img, [(100.0, 100.0), (200.0, 90.0)])
    assert len(res) == 2 and res[0]["arterial_side"] in ("left", "right")
    args.out = str(tmp_path / "cls.pt")
    assert classifier.train(args) == 0
    clf = classifier.Classifier("eager", tmp_path / "cls.pt")
    out = clf.predict([img[:64, :64], img[:50, :80, 1]])
    assert len(out) == 2 and all(c in classifier.CLASS_NAMES and 0 <= p <= 1 for c, p in out)


def test_fuse_conv_bn_keeps_outputs():
    from models.backends import fuse_conv_bn
    torch.manual_seed(0)
    u = UNet(base=4)
    for m in u.modules():   # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    u.eval()
    x = torch.randn(1, 1, 32, 48)
    with torch.no_grad():
        ref = u(x)
        fused = fuse_conv_bn(u)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        assert torch.allclose(fused(x), ref, atol=1e-4)


def test_arterial_side_from_calibre():
    from models.keypoints import arterial_prob_from_calibre
    assert arterial_prob_from_calibre(8.0, 11.0) > 0.9      # left limb narrower → arterial left
    assert arterial_prob_from_calibre(11.0, 8.0) < 0.1
    assert arterial_prob_from_calibre(9.0, 9.0) == pytest.approx(0.5)


def test_seg_cache_roundtrip(tmp_path, monkeypatch):
    from models import data_synthetic as DS
    calls = []

    def fake(seed):
        calls.append(seed)
        return np.full((32, 48, 3), seed % 256, np.uint8), np.full((32, 48), seed % 4, np.uint8)

    monkeypatch.setattr(DS, "_seg_pair", fake)
    cache = tmp_path / "seg.npz"
    a = DS.load_or_render_seg([10_000, 10_001], 1, str(cache))
    b = DS.load_or_render_seg([10_001, 10_002], 1, str(cache))
    assert calls == [10_000, 10_001, 10_002]
    assert np.array_equal(a[1][0], b[0][0]) and b[1][1].max() == 10_002 % 4
