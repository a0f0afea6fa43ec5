"""``nailfold train seg|keypoints|classifier|hed|dermis``: train a network, write a checkpoint.

In:  ``--data synthetic`` (the simulator; training seeds ≥ 10_000, validation 1_000–1_999; the
     evaluation seeds 0–999 are never used) or ``--data anfc:PATH`` (labelme dataset, subject-wise
     splits; seg only); budget ``--epochs`` × ``--steps`` optimizer steps of ``--batch-size``.
Out: checkpoint ``--out`` (default ``models/weights/<what>.pt``) with metadata (classes, input size,
     normalization, training data, seeds, git sha, validation metrics, date). Prints a summary line.

``hed`` and ``dermis`` are the skin-biopsy networks: dispatched to ``biopsy.train.train(what, args)``.
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from models import augment as A
from models import data_synthetic as DS
from models import metrics as M
from models.checkpoint import default_weights, save_checkpoint
from nailfold.errors import InputError

log = logging.getLogger(__name__)

WHATS = ("seg", "keypoints", "classifier", "hed", "dermis")
# schedule defaults of the capillaroscopy nets (the biopsy nets have theirs in biopsy.train.DEFAULTS)
NET_DEFAULTS = {"epochs": 10, "steps": 100, "batch_size": 8, "lr": 2e-3}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=WHATS)
    p.add_argument("--data", default="synthetic", help="synthetic | anfc:PATH (default synthetic)")
    # None = the model's own default: seg/keypoints/classifier 10 epochs × 100 steps, batch 8, lr
    # 2e-3; hed/dermis ``biopsy.train.DEFAULTS`` (``--steps`` is then the whole run)
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 10; hed/dermis: see --steps)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per epoch (default 100); hed/dermis: steps of the whole run "
                        "(default 1500 hed, 1200 dermis)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 (hed 4)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3; hed/dermis 1e-3)")
    p.add_argument("--out", default=None, help="checkpoint path (default: models/weights/<what>.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes rendering synthetic data")
    p.add_argument("--n-train", type=int, default=120, help="synthetic training images to render")
    p.add_argument("--n-val", type=int, default=12, help="synthetic validation images to render")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--init", default=None, help="start from this checkpoint's weights (fine-tune)")
    p.add_argument("--base", type=int, default=16, help="network width (base channels)")
    p.add_argument("--loop-cache", default=None, help=".npz cache of rendered per-loop windows")
    p.add_argument("--shape-variety", action="store_true",
                   help="classifier/keypoints: training images with wider loops and figure-8 crossings "
                        "(SimParams.shape_variety); validation images as usual")
    p.add_argument("--seg-cache", default=None, help=".npz cache of rendered segmentation images")
    p.add_argument("--levels", type=int, default=4, help="seg: U-Net levels")
    p.add_argument("--crop", type=int, default=192, help="training crop side (px at network scale)")
    p.add_argument("--pool", type=int, default=None,
                   help="hed/dermis: synthetic training fields to render (default 80 hed, 48 dermis)")
    p.add_argument("--schedule", choices=("plateau", "cosine"), default="plateau",
                   help="hed/dermis: lr schedule (ReduceLROnPlateau on validation, or cosine to 0)")
    p.add_argument("--swa", type=int, default=0, metavar="K",
                   help="hed/dermis: save the average of the last K of the 10 validation-point "
                        "snapshots instead of the best one (weight averaging)")


def run(args: argparse.Namespace) -> int:
    if args.what in ("hed", "dermis"):
        from biopsy.train import train
        return int(train(args.what, args) or 0)
    for name, value in NET_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(max(1, args.threads))
    fn = {"seg": train_seg, "keypoints": train_keypoints, "classifier": train_classifier}[args.what]
    return fn(args)


def _data_source(spec: str) -> tuple[str, str | None]:
    if spec == "synthetic":
        return "synthetic", None
    if spec.startswith("anfc:") and len(spec) > 5:
        return "anfc", spec[5:]
    raise InputError(f"--data must be 'synthetic' or 'anfc:PATH', got {spec!r}")


def _seeds(args) -> tuple[list[int], list[int]]:
    base = DS.TRAIN_SEED0 + 1000 * args.seed
    return list(range(base, base + args.n_train)), list(range(DS.VAL_SEED0, DS.VAL_SEED0 + args.n_val))


def _loop(model, loss_fn, loader_iter, args, evaluate, meta_fn, out, desc) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    total = max(1, args.epochs * args.steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.1)
    best, best_metrics = -1.0, {}
    step = 0
    t0 = time.time()
    for ep in range(args.epochs):
        model.train()
        bar = tqdm(range(args.steps), desc=f"{desc} epoch {ep + 1}/{args.epochs}", leave=False)
        run_loss = 0.0
        for _ in bar:
            batch = next(loader_iter)
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            step += 1
            lv = float(loss.detach())
            run_loss = 0.9 * run_loss + 0.1 * lv if step > 1 else lv
            bar.set_postfix(loss=f"{run_loss:.4f}")
        model.eval()
        with torch.no_grad():
            metrics = evaluate(model)
        metrics["train_loss"] = round(run_loss, 5)
        score = metrics["score"]
        log.info("epoch %d: %s", ep + 1, metrics)
        print(f"{desc} epoch {ep + 1}/{args.epochs}: " + " ".join(f"{k}={v}" for k, v in metrics.items()),
              flush=True)
        if not best_metrics or score >= best:
            best, best_metrics = score, dict(metrics, epoch=ep + 1)
            save_checkpoint(out, model, meta_fn(best_metrics))
    print(f"{desc}: best {best_metrics} -> {out} ({time.time() - t0:.0f} s)")
    return best_metrics


def _infinite(loader):
    while True:
        for b in loader:
            yield b
        if hasattr(loader.dataset, "epoch"):
            loader.dataset.epoch += 1


# ------------------------------------------------------------------------------------ seg
def _load_seg_items(args):
    kind, path = _data_source(args.data)
    if kind == "synthetic":
        tr, va = _seeds(args)
        print(f"rendering {len(tr)} training + {len(va)} validation synthetic images ...", flush=True)
        t = time.time()
        cache = getattr(args, "seg_cache", None)
        train = DS.load_or_render_seg(tr, args.workers, cache)
        val = DS.load_or_render_seg(va, args.workers, cache)
        print(f"rendered in {time.time() - t:.0f} s", flush=True)
        desc = {"source": "synthetic", "train_seeds": [tr[0], tr[-1]], "val_seeds": [va[0], va[-1]],
                "simulator": "stream.synthetic.render_still, varied by models.data_synthetic.sim_params"}
        return train, val, desc
    from models.data_anfc import load_anfc
    ds = load_anfc(path)
    train = [ds.seg_item(r) for r in ds.split("train")]
    val = [ds.seg_item(r) for r in ds.split("val")] or train[:1]
    if not train:
        raise InputError(f"ANFC dataset {path}: no training images")
    return train, val, {"source": f"anfc:{path}", "train_subjects": sorted({r.subject for r in ds.split('train')}),
                        "val_subjects": sorted({r.subject for r in ds.split('val')})}


def eval_seg_model(model, items) -> dict:
    sens, dic, prec = [], [], []
    for img, lab in items:
        x = torch.from_numpy(A.standardize(A.green(img)))[None, None]
        pred = model(x)[0].argmax(0).numpy()
        fg_t, fg_p = np.isin(lab, (1, 2)), np.isin(pred, (1, 2))
        sens.append(M.sensitivity(fg_p, fg_t))
        prec.append(M.precision(fg_p, fg_t))
        dic.append(M.dice(fg_p, fg_t))
    s, d = float(np.mean(sens)), float(np.mean(dic))
    return {"sensitivity": round(s, 4), "precision": round(float(np.mean(prec)), 4), "dice": round(d, 4),
            "score": round(0.5 * s + 0.5 * d, 4)}


def train_seg(args) -> int:
    from models.losses import dice_ce_loss
    from models.unet import UNet, n_params
    train, val, data_desc = _load_seg_items(args)
    c = min(args.crop, *train[0][0].shape[:2]) // 16 * 16
    crop = (c, c)
    ds = DS.SegDataset(train, crop_hw=crop, seed=args.seed, length=max(len(train), args.batch_size * args.steps))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(args.seed))
    arch = {"in_ch": 1, "n_classes": 4, "base": args.base, "levels": getattr(args, "levels", 4)}
    if args.init:
        from models.checkpoint import load_checkpoint, load_state
        ck = load_checkpoint(args.init, "seg")
        arch = dict(ck.meta["arch"])
        model = load_state(UNet(**arch), ck, args.init)
    else:
        model = UNet(**arch)
    model = model.to(memory_format=torch.channels_last)
    cw = torch.tensor([1.0, 2.0, 2.5, 2.0])   # blurred (faint, defocused) vessels were the ones missed

    def loss_fn(m, batch):
        x, y = batch
        return dice_ce_loss(m(x.contiguous(memory_format=torch.channels_last)), y, class_weights=cw,
                            union_classes=(1, 2))

    def meta_fn(metrics):
        return {"kind": "seg", "arch": arch, "classes": ["background", "capillary", "blurred", "haemorrhage"],
                "input": "standardized green channel, long side 512 (multiples of 16)", "input_long_side": A.SEG_LONG,
                "normalization": "(g - median) / ((p90 - p10) / 2.56), clip ±8", "training_data": data_desc,
                "seeds": {"torch": args.seed}, "metrics": metrics, "params": n_params(model),
                "train": {"epochs": args.epochs, "steps": args.steps, "batch": args.batch_size, "lr": args.lr,
                          "crop": list(crop), "init": args.init, "n_train_images": len(train),
                          "loss": "CE (class weights 1/2/2.5/2) + Dice per class + Dice of capillary∪blurred"}}

    out = args.out or default_weights("seg")
    _loop(model, loss_fn, _infinite(loader), args, lambda m: eval_seg_model(m, val), meta_fn, out, "seg")
    return 0


def train_keypoints(args) -> int:
    from models.keypoints import train as kp_train
    return kp_train(args)


def train_classifier(args) -> int:
    from models.classifier import train as cls_train
    return cls_train(args)
