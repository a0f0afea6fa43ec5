"""Kymographs: intensity along a capillary centerline over time.

In:  centerlines ``(N, 2)`` float (x, y) px in reference (first-frame) coordinates with local vessel
     widths ``(N,)`` px; gray uint8 frames with their stabilization shift ``(dx, dy)`` px
     (content displacement vs the reference, see :mod:`stream.stabilize`).
Out: one kymograph row per frame per capillary — ``(N,)`` float32 mean intensity (gray levels)
     across the vessel at each centerline sample (~1 px apart); rows stack into a
     ``(time, distance)`` = ``(frames, px)`` image, distance measured from the centerline start.

Sampling uses ``cv2.remap`` on precomputed maps (``n_across`` points on the local normal, spanning
``across_frac`` × the local width); the stabilization shift is folded into the maps (``map + d``),
so frames are never warped as a whole. :class:`KymographBank` samples all capillaries with a
single remap per frame. :func:`destripe` removes static banding (per-position temporal mean) and
per-row brightness flicker.

Samples that the camera motion carries outside the frame (a loop at the edge of the field of
view) are not image data: :func:`in_view` flags them, :class:`KymographBuffer` keeps that flag
per sample, and :func:`fill_out_of_view` replaces them with the column's in-view mean (zero after
destriping), so border-replicated pixels never pose as moving texture.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from stream.stabilize import pose_matrix

log = logging.getLogger(__name__)


def resample_polyline(points: np.ndarray, step: float = 1.0) -> np.ndarray:
    """Resample an ``(N, 2)`` polyline at ``step`` px arc-length spacing (endpoints kept)."""
    pts = np.asarray(points, np.float64)
    if len(pts) < 2:
        return pts.astype(np.float32)
    seg = np.sqrt((np.diff(pts, axis=0) ** 2).sum(1))
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] <= 0:
        return pts[:1].astype(np.float32)
    n = max(2, int(round(s[-1] / step)) + 1)
    t = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(t, s, pts[:, 0]), np.interp(t, s, pts[:, 1])], 1).astype(np.float32)


def sampling_maps(centerline: np.ndarray, width_px: np.ndarray | float, n_across: int = 5,
                  across_frac: float = 0.6, smooth_px: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """``(map_x, map_y)``, each ``(n_across, N)`` float32: sample points on the local normal of
    every centerline point, spread over ``across_frac`` × local width (px)."""
    c = np.asarray(centerline, np.float64)
    n = len(c)
    w = np.broadcast_to(np.asarray(width_px, np.float64), (n,)) if np.ndim(width_px) == 0 else \
        np.asarray(width_px, np.float64)
    if n >= 3:
        cs = gaussian_filter1d(c, sigma=max(0.5, smooth_px), axis=0, mode="nearest")
        tang = np.gradient(cs, axis=0)
    else:
        tang = np.tile(c[-1] - c[0] if n == 2 else np.array([1.0, 0.0]), (n, 1))
    norm = np.sqrt((tang ** 2).sum(1, keepdims=True))
    tang = tang / np.where(norm > 1e-9, norm, 1.0)
    normal = np.stack([-tang[:, 1], tang[:, 0]], 1)
    ws = np.where(np.isfinite(w) & (w > 0), w, 3.0)
    offs = np.linspace(-0.5, 0.5, n_across)[:, None] * (across_frac * ws)[None, :] if n_across > 1 \
        else np.zeros((1, n))
    mx = c[None, :, 0] + offs * normal[None, :, 0]
    my = c[None, :, 1] + offs * normal[None, :, 1]
    return mx.astype(np.float32), my.astype(np.float32)


def frame_maps(maps: tuple[np.ndarray, np.ndarray], shape: tuple[int, ...], dx: float = 0.0, dy: float = 0.0,
               angle: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Sampling maps (reference coordinates) moved into the coordinates of a frame of ``shape``
    whose content has the pose ``(dx, dy, angle)`` (:func:`stream.stabilize.pose_matrix`)."""
    mx, my = maps
    if angle == 0.0:
        return mx + np.float32(dx), my + np.float32(dy)
    m = pose_matrix(dx, dy, angle, shape).astype(np.float32)
    return (m[0, 0] * mx + m[0, 1] * my + m[0, 2]), (m[1, 0] * mx + m[1, 1] * my + m[1, 2])


def sample_row(gray: np.ndarray, maps: tuple[np.ndarray, np.ndarray], dx: float = 0.0,
               dy: float = 0.0, angle: float = 0.0) -> np.ndarray:
    """One kymograph row ``(N,)`` float32 from ``gray`` (uint8/float) whose content has the pose
    ``(dx, dy, angle)`` relative to the maps' reference coordinates."""
    return _remap_row(gray, *frame_maps(maps, gray.shape, dx, dy, angle))


def sample_rows(frames, maps: tuple[np.ndarray, np.ndarray],
                with_view: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Kymograph rows ``(F, N)`` float32 of ``frames``, an iterable of ``(gray, dx, dy, angle)``
    (images of one shape, poses as in :func:`sample_row`): each row equal to :func:`sample_row`'s,
    remapped into one array and averaged once (a new loop's trace samples ≈ 80 recent frames for
    each path it scores). ``with_view``: also the ``(F, N)`` bool :func:`in_view` flags, from the
    same moved maps."""
    frames = list(frames)
    mx = maps[0]
    v = np.empty((len(frames),) + mx.shape, frames[0][0].dtype if frames else np.uint8)
    view = np.zeros((len(frames), mx.shape[1]), bool)
    for i, (g, dx, dy, a) in enumerate(frames):
        x, y = frame_maps(maps, g.shape, dx, dy, a)
        cv2.remap(g, x, y, cv2.INTER_LINEAR, dst=v[i], borderMode=cv2.BORDER_REPLICATE)
        if with_view:
            view[i] = _inside(x, y, g.shape)
    rows = v.astype(np.float32).mean(axis=1)
    return (rows, view) if with_view else rows


def _remap_row(gray: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean over the across-samples of ``gray`` sampled at frame coordinates ``(x, y)``."""
    v = cv2.remap(gray, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return v.astype(np.float32).mean(axis=0)


def _inside(x: np.ndarray, y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Every across-sample of each point at frame coordinates ``(x, y)`` inside ``shape``."""
    h, w = shape[:2]
    return ((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)).all(axis=0)


def in_view(maps: tuple[np.ndarray, np.ndarray], shape: tuple[int, ...], dx: float = 0.0,
            dy: float = 0.0, angle: float = 0.0) -> np.ndarray:
    """``(N,)`` bool: every across-sample of each centerline point lies inside a frame of
    ``shape`` ``(H, W, …)`` under the pose ``(dx, dy, angle)`` (the interpolation support
    included)."""
    return _inside(*frame_maps(maps, shape, dx, dy, angle), shape)


def column_mean(rows: np.ndarray, view: np.ndarray | None = None) -> np.ndarray:
    """Per-column mean ``(N,)`` of ``(T, N)`` kymograph rows over the in-view samples ``view``
    ``(T, N)`` bool; a column never in view gets the mean of all in-view samples (0 if none)."""
    r = np.asarray(rows, np.float32)
    if view is None or bool(np.all(view)):
        return r.mean(axis=0) if len(r) else np.zeros(r.shape[1], np.float32)
    v = np.asarray(view, bool)
    cnt = v.sum(axis=0)
    tot = np.where(v, r, 0.0).sum(axis=0, dtype=np.float64)
    overall = float(tot.sum() / cnt.sum()) if cnt.sum() else 0.0
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), overall).astype(np.float32)


def fill_out_of_view(rows: np.ndarray, view: np.ndarray | None, background: np.ndarray) -> np.ndarray:
    """``rows`` with the samples not in ``view`` replaced by ``background`` (per column)."""
    if view is None or bool(np.all(view)):
        return rows
    return np.where(view, rows, np.asarray(background, np.float32)[None, :]).astype(np.float32)


def tissue_level(image: np.ndarray, mask: np.ndarray, bbox: tuple[int, int, int, int], vessels: np.ndarray,
                 inner_px: int = 3, outer_px: int = 12, min_pixels: int = 20) -> float:
    """Grey level of the tissue around one capillary: the median of ``image`` (2-D gray, e.g. a
    stabilized keyframe mean) over a ring from ``inner_px`` to ``outer_px`` px outside the loop's
    own pixels (``mask``, bool, the size of ``bbox`` = (x0, y0, x1, y1) half-open, in ``image``
    coordinates), leaving out every pixel within ``inner_px`` of any vessel (``vessels``, bool,
    the shape of ``image``: the keyframe's segmentation). With the vessel's own mean grey level
    it gives the loop's contrast ``log(tissue / vessel)`` (∝ the blood column's absorbance by
    Beer–Lambert). NaN when fewer than ``min_pixels`` ring pixels remain (a loop packed among
    others, or at the image border)."""
    img = np.asarray(image)
    h, w = img.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in bbox)
    pad = int(outer_px) + 1
    X0, Y0, X1, Y1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    if X1 <= X0 or Y1 <= Y0:
        return float("nan")
    own = np.zeros((Y1 - Y0, X1 - X0), np.uint8)
    m = np.asarray(mask, bool)
    own[y0 - Y0:y0 - Y0 + m.shape[0], x0 - X0:x0 - X0 + m.shape[1]] = m[:Y1 - y0, :X1 - x0]
    k_in = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * int(inner_px) + 1,) * 2)
    k_out = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * int(outer_px) + 1,) * 2)
    near_vessel = cv2.dilate(np.asarray(vessels[Y0:Y1, X0:X1], np.uint8), k_in) > 0
    ring = (cv2.dilate(own, k_out) > 0) & ~(cv2.dilate(own, k_in) > 0) & ~near_vessel
    vals = img[Y0:Y1, X0:X1][ring]
    return float(np.median(vals)) if vals.size >= min_pixels else float("nan")


def tissue_levels(image: np.ndarray, labels: np.ndarray, caps: list) -> dict[int, float]:
    """``id(capillary)`` → :func:`tissue_level` of each of ``caps`` (:class:`stream.capillary.Capillary`)
    on ``image`` segmented as ``labels`` (any non-zero label is vessel); NaN where it cannot be
    measured — never raises."""
    vessels = np.asarray(labels) > 0
    out = {}
    for c in caps:
        try:
            out[id(c)] = tissue_level(image, c.mask, c.bbox, vessels)
        except (ValueError, TypeError, IndexError, cv2.error):
            log.debug("no tissue level for a loop at %s", c.bbox, exc_info=True)
            out[id(c)] = float("nan")
    return out


def loop_contrast(image: np.ndarray, maps: tuple[np.ndarray, np.ndarray], tissue: float) -> float:
    """A loop's log contrast on one image: the median over its kymograph columns of
    log(``tissue`` / vessel), the vessel grey level sampled from ``image`` (2-D gray, in the maps'
    reference coordinates, e.g. a stabilized keyframe mean) as a kymograph row is. ∝ the blood
    column's absorbance (Beer–Lambert); both grey levels come from the same image, so a later
    change of the camera's gain or exposure does not move it. NaN for a non-finite or
    non-positive ``tissue`` (:func:`tissue_level`)."""
    if not (math.isfinite(float(tissue)) and tissue > 0):
        return float("nan")
    vessel = sample_row(np.asarray(image, np.float32), maps)
    if vessel.size == 0:
        return float("nan")
    return float(np.median(math.log(max(float(tissue), 1.0)) - np.log(np.maximum(vessel, 1.0))))


FAINT_CONTRAST_SHARE = 0.15   # a structure below this × the reference contrast is faint (see faint_contrast) ...
FAINT_CONTRAST_FLOOR = 0.08   # ... or, without a reference, below this log contrast


def faint_contrast(contrast: float, reference: float) -> bool:
    """True when a vessel-like structure's log contrast (:func:`loop_contrast`) is too faint to
    be a capillary the analysis can use: below ``FAINT_CONTRAST_SHARE`` × ``reference`` (the median
    contrast of the loops known to be vessels: flowing, or in focus), or below
    ``FAINT_CONTRAST_FLOOR`` when there is no reference (NaN). A smooth blotchy tissue background
    gives the U-Net out-of-focus "vessels" at 0.015–0.074 (the tests' toy scope, whose six loops
    read 0.77–0.88); the synthetic scope's deep background loops read 0.096–0.18, 0.22–0.41 × its
    distal row. False when the contrast was not measured."""
    if not math.isfinite(contrast):
        return False
    limit = FAINT_CONTRAST_SHARE * reference if math.isfinite(reference) else FAINT_CONTRAST_FLOOR
    return contrast < limit


def destripe(kymo: np.ndarray) -> np.ndarray:
    """Remove static banding (per-column temporal mean) and per-row mean; float32, zero mean."""
    k = np.asarray(kymo, np.float32)
    if k.size == 0:
        return k.copy()
    k = k - k.mean(axis=0, keepdims=True)
    return k - k.mean(axis=1, keepdims=True)


def to_uint8(kymo: np.ndarray, clip_sd: float = 3.0) -> np.ndarray:
    """Contrast-stretch a (destriped) kymograph to uint8 for display: mean → 127.5, ±``clip_sd``
    SD → 0 / 255 (clipped; values truncate as ``astype`` would). One OpenCV pass for the mean and
    SD and one for the scaling (≈ 0.03 ms for 200 × 334, a fifth of the numpy formulation; the
    live stage draws every loop's kymograph for each result message)."""
    k = np.ascontiguousarray(kymo, np.float32)
    if k.size == 0:
        return np.zeros(k.shape, np.uint8)
    if k.ndim != 2:
        k = k.reshape(k.shape[0], -1) if k.ndim > 2 else k.reshape(1, -1)
    m, sd = cv2.meanStdDev(k)
    m, sd = float(m[0, 0]), float(sd[0, 0]) or 1.0
    s = 255.0 / (2 * clip_sd * sd)
    # addWeighted rounds to nearest: the offset 127.0 (not 127.5) truncates like astype(uint8)
    out = cv2.addWeighted(k, s, k, 0.0, 127.0 - m * s, dtype=cv2.CV_8U)
    return out.reshape(np.shape(kymo))


class KymographBuffer:
    """Rolling ``(capacity, N)`` float32 ring of kymograph rows with their absolute frame numbers."""

    def __init__(self, length: int, capacity: int):
        self.length = int(length)
        self.capacity = max(1, int(capacity))
        self._new_rows()                # self._rows, self._view
        self._frame = np.full(self.capacity, -1, np.int64)
        self.count = 0          # rows appended since creation (less those dropped: :meth:`drop_from`)
        self._held = 0          # rows held (≤ capacity)
        self.last_frame = -1
        self.samples_out_of_view = 0   # samples appended outside the frame (see :func:`in_view`)
        self.released = False   # rows and flags freed (:meth:`release`)

    def release(self) -> None:
        """Free the rows and in-view flags of a kymograph that will not grow or be read again (a
        loop of a field of view the probe has left): what is left are its counts, frame numbers and
        :attr:`out_of_view_fraction`; :meth:`append`, :meth:`window` and :meth:`latest` then raise
        ``RuntimeError``."""
        self._rows = self._view = None
        self.released = True

    def reopen(self) -> None:
        """Take rows again after :meth:`release` (the probe came back to the loop's field of view):
        empty rows, the counts and frame numbers kept, so the rows appended next follow a gap."""
        if self.released:
            self._new_rows()
            self._frame[:] = -1
            self._held = 0
            self.released = False

    def _new_rows(self) -> None:
        """Empty rows and in-view flags, ``capacity`` × ``length``."""
        self._rows = np.zeros((self.capacity, self.length), np.float32)
        self._view = np.ones((self.capacity, self.length), bool)

    def _check(self) -> None:
        if self.released:
            raise RuntimeError("this kymograph's rows were released")

    def append(self, row: np.ndarray, frame_no: int, view: np.ndarray | None = None) -> None:
        """Append one row; ``view`` ``(N,)`` bool marks the samples inside the frame (all if None)."""
        self._check()
        i = self.count % self.capacity
        self._rows[i] = row
        self._view[i] = True if view is None else view
        if view is not None:
            self.samples_out_of_view += int(self.length - np.count_nonzero(view))
        self._frame[i] = frame_no
        self.count += 1
        self._held = min(self._held + 1, self.capacity)
        self.last_frame = int(frame_no)

    def drop_from(self, frame_no: int) -> int:
        """Forget the newest rows, those of frames ≥ ``frame_no`` (e.g. frames of another field
        of view, sampled before the change was recognised); returns how many were dropped."""
        self._check()
        k = 0
        while self._held > 0:
            i = (self.count - 1) % self.capacity
            if self._frame[i] < frame_no:
                break
            self.samples_out_of_view -= int(self.length - np.count_nonzero(self._view[i]))
            self._frame[i] = -1
            self.count -= 1
            self._held -= 1
            k += 1
        self.last_frame = int(self._frame[(self.count - 1) % self.capacity]) if self._held else -1
        return k

    @property
    def out_of_view_fraction(self) -> float:
        """Share of all samples appended so far that fell outside the frame (0..1)."""
        n = self.count * self.length
        return self.samples_out_of_view / n if n else 0.0

    @property
    def first_frame(self) -> int:
        """Oldest frame number still held (−1 if empty)."""
        if self._held == 0:
            return -1
        return int(self._frame[(self.count - self._held) % self.capacity])

    def _newest(self, n: int | None = None) -> np.ndarray:
        """Ring indices of the newest ``n`` held rows (all by default), oldest first."""
        self._check()
        held = self._held
        n = held if n is None else min(n, held)
        return np.arange(self.count - n, self.count) % self.capacity

    def _in_window(self, start_frame: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """(ring indices, window rows) of the held rows of frames ``start_frame .. +n_frames-1``."""
        self._check()
        idx = self._newest()
        fr = self._frame[idx]
        sel = (fr >= start_frame) & (fr < start_frame + n_frames)
        return idx[sel], fr[sel] - start_frame

    def window(self, start_frame: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows for frames ``start_frame .. start_frame+n_frames-1`` → ``(kymo (n, N), valid (n,))``.
        Frames not held (dropped / before the capillary existed) are rows of the column mean,
        i.e. zero after :func:`destripe`, with ``valid`` False."""
        out = np.zeros((n_frames, self.length), np.float32)
        valid = np.zeros(n_frames, bool)
        src, pos = self._in_window(start_frame, n_frames)
        out[pos] = self._rows[src]
        valid[pos] = True
        if valid.any() and not valid.all():
            out[~valid] = out[valid].mean(axis=0)
        return out, valid

    def window_view(self, start_frame: int, n_frames: int) -> np.ndarray:
        """In-view flags ``(n, N)`` bool of :meth:`window`'s rows (rows not held: True, they are
        already filled with the column mean)."""
        out = np.ones((n_frames, self.length), bool)
        src, pos = self._in_window(start_frame, n_frames)
        out[pos] = self._view[src]
        return out

    def latest(self, n: int | None = None) -> np.ndarray:
        """The newest ``n`` rows (all held rows by default) in time order, ``(n, N)`` float32."""
        return self._rows[self._newest(n)]

    def latest_view(self, n: int | None = None) -> np.ndarray:
        """In-view flags ``(n, N)`` bool of :meth:`latest`'s rows."""
        return self._view[self._newest(n)]

@dataclass
class _Entry:
    key: int
    start: int
    length: int


class KymographBank:
    """Samples many capillaries with one ``cv2.remap`` per frame.

    ``add(key, centerline, width)`` registers a capillary; ``sample(gray, dx, dy, angle)`` returns
    ``{key: row}``. Maps are concatenated along the distance axis."""

    def __init__(self, n_across: int = 5, across_frac: float = 0.6):
        self.n_across = n_across
        self.across_frac = across_frac
        self._entries: dict[int, _Entry] = {}
        self._mx = np.zeros((n_across, 0), np.float32)
        self._my = np.zeros((n_across, 0), np.float32)

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def keys(self) -> list[int]:
        return list(self._entries)

    def add(self, key: int, centerline: np.ndarray, width_px: np.ndarray | float) -> int:
        """Register (or replace) ``key``; returns the kymograph length N (px samples)."""
        if key in self._entries:
            self.remove(key)
        mx, my = sampling_maps(centerline, width_px, self.n_across, self.across_frac)
        start = self._mx.shape[1]
        self._mx = np.ascontiguousarray(np.concatenate([self._mx, mx], 1))
        self._my = np.ascontiguousarray(np.concatenate([self._my, my], 1))
        self._entries[key] = _Entry(key, start, mx.shape[1])
        return mx.shape[1]

    def maps(self, key: int) -> tuple[np.ndarray, np.ndarray]:
        """``key``'s own sampling maps (:func:`sampling_maps` of what :meth:`add` was given), copies."""
        e = self._entries[key]
        return (np.ascontiguousarray(self._mx[:, e.start:e.start + e.length]),
                np.ascontiguousarray(self._my[:, e.start:e.start + e.length]))

    def remove(self, key: int) -> None:
        e = self._entries.pop(key)
        keep = np.ones(self._mx.shape[1], bool)
        keep[e.start:e.start + e.length] = False
        self._mx = np.ascontiguousarray(self._mx[:, keep])
        self._my = np.ascontiguousarray(self._my[:, keep])
        for o in self._entries.values():
            if o.start > e.start:
                o.start -= e.length

    def sample_in_view(self, gray: np.ndarray, dx: float = 0.0, dy: float = 0.0,
                       angle: float = 0.0) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray | None]]:
        """One frame's rows and in-view flags for every capillary, its sampling maps moved once:
        ``({key: (N,) row}, {key: (N,) bool})`` — each row as :func:`sample_row`, each flag as
        :func:`in_view` gives it for that capillary alone, ``None`` for a capillary entirely in
        view (the common case: no per-sample flags to store)."""
        if not self._entries:
            return {}, {}
        x, y = frame_maps((self._mx, self._my), gray.shape, dx, dy, angle)
        row = _remap_row(gray, x, y)
        return ({k: row[e.start:e.start + e.length] for k, e in self._entries.items()},
                self._views(_inside(x, y, gray.shape)))

    def _views(self, v: np.ndarray) -> dict[int, np.ndarray | None]:
        """Per-capillary split of the bank's in-view flags (None where all are in view)."""
        if v.all():
            return {k: None for k in self._entries}
        out = {}
        for k, e in self._entries.items():
            seg = v[e.start:e.start + e.length]
            out[k] = None if seg.all() else seg
        return out
