"""ANFC-style real-data loader: labelme JSON per image → masks, keypoints, subject-wise splits.

In:  a directory (searched recursively) of ``Subject_Pic.jpg`` images (1024×768 in ANFC) each with a
     labelme ``Subject_Pic.json`` beside it: ``shapes`` = [{``label``, ``points`` [[x, y], ...],
     ``shape_type`` "polygon" | "point", ``group_id``}]. The subject is the file stem before the last
     ``_`` (``"S12_3.jpg"`` → subject ``"S12"``; a stem without ``_`` is its own subject).
Out: :class:`AnfcDataset` — ``records``, ``split("train"|"val"|"test")`` (subject-wise: no subject
     in two splits; deterministic in ``seed``), ``read(rec)`` → :class:`AnfcSample` (image BGR uint8,
     label mask uint8 0..3, loops {group_id: {point name: (x, y)}}, crossings {group_id: [(x, y)]}),
     ``seg_item(rec)`` → (image, labels) at segmentation size (long side 512).

Polygon labels → mask values (drawn in this order, later wins): ``normal``/``abnormal`` → 1
capillary; ``aggregation`` → 1 capillary (our choice: an aggregation outlines a cluster of in-focus
vessels; keeping it as capillary avoids teaching the network that visible vessels are background);
``blur`` → 2 blurred; ``hemo`` → 3 haemorrhage. Unknown polygon labels are logged and skipped.
Points ``up, down, left-left, left-right, right-left, right-right, left-bottom, right-bottom`` are
grouped into loops by ``group_id``; ``conj-N`` points are crossings of that group. Points without a
group_id go to group ``-1``.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from models import augment as A
from nailfold.errors import InputError
from nailfold.images import read_bgr

log = logging.getLogger(__name__)

POLY_LABELS = {"normal": 1, "abnormal": 1, "aggregation": 1, "blur": 2, "hemo": 3}
DRAW_ORDER = ("normal", "abnormal", "aggregation", "blur", "hemo")
POINT_LABELS = ("up", "down", "left-left", "left-right", "right-left", "right-right", "left-bottom",
                "right-bottom")
_CONJ = re.compile(r"^conj-?\d*$")


@dataclass
class AnfcRecord:
    image_path: Path
    json_path: Path
    subject: str


@dataclass
class AnfcSample:
    image: np.ndarray
    mask: np.ndarray
    loops: dict = field(default_factory=dict)
    crossings: dict = field(default_factory=dict)
    record: AnfcRecord | None = None


def subject_of(stem: str) -> str:
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def parse_labelme(path: Path, shape_hw: tuple[int, int]) -> tuple[np.ndarray, dict, dict]:
    """(mask uint8 0..3, loops, crossings) from one labelme file for an image of ``shape_hw``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        shapes = data["shapes"]
        if not isinstance(shapes, list):
            raise TypeError("shapes is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"bad labelme file {path}: {e}") from None
    mask = np.zeros(shape_hw, np.uint8)
    polys: dict[str, list] = {k: [] for k in DRAW_ORDER}
    loops: dict = {}
    crossings: dict = {}
    for s in shapes:
        label = str(s.get("label", "")).strip().lower()
        pts = np.asarray(s.get("points", []), float).reshape(-1, 2)
        kind = s.get("shape_type", "polygon")
        gid = s.get("group_id")
        gid = -1 if gid is None else int(gid)
        if kind == "polygon":
            if label in polys and len(pts) >= 3:
                polys[label].append(np.round(pts).astype(np.int32))
            else:
                log.debug("%s: skipping polygon %r", path, label)
        elif kind == "point" and len(pts) >= 1:
            xy = (float(pts[0, 0]), float(pts[0, 1]))
            if label in POINT_LABELS:
                loops.setdefault(gid, {})[label] = xy
            elif _CONJ.match(label):
                crossings.setdefault(gid, []).append(xy)
            else:
                log.debug("%s: skipping point %r", path, label)
    for label in DRAW_ORDER:
        if polys[label]:
            cv2.fillPoly(mask, polys[label], int(POLY_LABELS[label]))
    return mask, loops, crossings


class AnfcDataset:
    def __init__(self, root: str | Path, seed: int = 0, fractions=(0.7, 0.15, 0.15)):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"ANFC dataset directory not found: {self.root}")
        recs = []
        for jp in sorted(self.root.rglob("*.json")):
            ip = next((jp.with_suffix(e) for e in (".jpg", ".jpeg", ".png", ".JPG") if jp.with_suffix(e).is_file()),
                      None)
            if ip is None:
                log.warning("%s has no image beside it; skipped", jp)
                continue
            recs.append(AnfcRecord(ip, jp, subject_of(jp.stem)))
        if not recs:
            raise InputError(f"no labelme (image + .json) pairs under {self.root}")
        self.records = recs
        subjects = sorted({r.subject for r in recs})
        order = np.random.default_rng(seed).permutation(len(subjects))
        n = len(subjects)
        n_test = int(round(fractions[2] * n)) if n >= 3 else 0
        n_val = int(round(fractions[1] * n)) if n >= 3 else (1 if n == 2 else 0)
        n_test, n_val = max(n_test, 1 if n >= 3 else 0), max(n_val, 1 if n >= 2 else 0)
        self.subject_split = {}
        for rank, i in enumerate(order):
            self.subject_split[subjects[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"

    def split(self, name: str) -> list[AnfcRecord]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train|val|test, got {name!r}")
        return [r for r in self.records if self.subject_split[r.subject] == name]

    def read(self, rec: AnfcRecord) -> AnfcSample:
        img = read_bgr(rec.image_path)   # any depth → 8-bit BGR; InputError if not readable
        mask, loops, cross = parse_labelme(rec.json_path, img.shape[:2])
        return AnfcSample(img, mask, loops, cross, rec)

    def seg_item(self, rec: AnfcRecord) -> tuple[np.ndarray, np.ndarray]:
        from models.data_synthetic import _resize_labels
        s = self.read(rec)
        h, w = A.seg_size(s.image.shape)
        return cv2.resize(s.image, (w, h), interpolation=cv2.INTER_AREA), _resize_labels(s.mask, (h, w))


def load_anfc(root: str | Path, seed: int = 0) -> AnfcDataset:
    return AnfcDataset(root, seed)
