"""Image normalization, canonical scaling, fixed-size crops and training augmentation.

Conventions shared by every network here:

- **Network input** = the green channel (BGR index 1; gray images as they are), standardized per
  image: ``(g - median) / spread`` with ``spread = (p90 - p10) / 2.56`` (a robust σ), clipped to
  ±8. This plays the role of ANFC's "shift the green histogram's centre to a fixed value" but is also
  invariant to contrast, so other scopes/exposures map to the same range.
- **Canonical scale**: an image is thought of at long side = 1024 px (a 1024×768 frame is canonical
  as is; a 2000×1500 still is scaled by 0.512). Segmentation runs at half canonical (long side 512).
- **Per-loop crops** (keypoints, classifier): a square window of ``CROP_CANON`` = 192 canonical px
  centred on the loop, resampled to the network's size. Crops outside the image are padded with the
  border's reflection.

Augmentations (numpy/OpenCV, uint8 in → uint8 out, seeded ``np.random.Generator``): flips, 90°
rotations (segmentation only), small rotation/shear/scale, brightness/contrast/gamma, blur, noise,
JPEG re-compression, channel-mix (colour → "green" from other contrasts).
"""
from __future__ import annotations

import cv2
import numpy as np

CANON_LONG = 1024
SEG_LONG = 512
CROP_CANON = 192
KP_WINDOW_CANON = 256


def green(image: np.ndarray) -> np.ndarray:
    """BGR/BGRA/gray uint8 → (H, W) uint8 green channel."""
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] >= 3:
        return np.ascontiguousarray(image[:, :, 1])
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    raise ValueError(f"unsupported image shape {image.shape}")


def standardize(g: np.ndarray) -> np.ndarray:
    """(H, W) uint8/float → float32 robust z-score (median 0, robust σ 1), clipped to ±8."""
    g = g.astype(np.float32)
    sub = g[::4, ::4] if g.size > 65536 else g
    p10, p50, p90 = np.percentile(sub, [10, 50, 90])
    spread = max((p90 - p10) / 2.56, 1.0)
    return np.clip((g - p50) / spread, -8, 8).astype(np.float32)


def canon_factor(shape: tuple[int, ...]) -> float:
    """Factor image px → canonical px (long side 1024)."""
    return CANON_LONG / float(max(shape[0], shape[1]))


def seg_size(shape: tuple[int, ...], long_side: int = SEG_LONG) -> tuple[int, int]:
    """(H, W) network input size for an image of ``shape``: long side ``long_side``, multiples of 16."""
    h, w = shape[:2]
    f = long_side / float(max(h, w))
    return max(16, int(round(h * f / 16)) * 16), max(16, int(round(w * f / 16)) * 16)


def crop_square(img: np.ndarray, center_xy: tuple[float, float], size_px: float, out: int,
                interp: int = cv2.INTER_AREA) -> tuple[np.ndarray, np.ndarray]:
    """Square window of side ``size_px`` (image px) centred at ``center_xy`` resampled to out×out.

    Returns (crop, A) where A is the 2×3 affine map image px → crop px (apply to (x, y, 1))."""
    s = out / float(size_px)
    cx, cy = center_xy
    A = np.array([[s, 0, out / 2.0 - s * cx - 0.5 + 0.5 * s], [0, s, out / 2.0 - s * cy - 0.5 + 0.5 * s]],
                 np.float64)
    if s < 1 and interp == cv2.INTER_AREA:
        # pre-blur to avoid aliasing; warpAffine has no area mode
        k = 1.0 / s
        img = cv2.GaussianBlur(img, (0, 0), max(0.1, 0.5 * (k - 1) ** 0.5 + 0.3 * (k - 1)))
        interp = cv2.INTER_LINEAR
    crop = cv2.warpAffine(img, A, (out, out), flags=interp, borderMode=cv2.BORDER_REFLECT101)
    return crop, A


def loop_crop(image: np.ndarray, center_xy: tuple[float, float], out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-loop crop (CROP_CANON canonical px, centred at ``center_xy`` image px) of the green channel,
    resampled to out×out; returns (uint8 crop, affine image px → crop px)."""
    size = CROP_CANON / canon_factor(image.shape)
    return crop_square(green(image), center_xy, size, out)


# ----------------------------------------------------------------------------- augmentation
def photometric(g: np.ndarray, rng: np.random.Generator, strength: float = 1.0,
                max_blur: float | None = None) -> np.ndarray:
    """Random brightness/contrast/gamma/blur/motion blur/noise/JPEG/illumination ramp on a uint8 gray
    image. ``max_blur`` caps the Gaussian blur σ (px of ``g``; default ``1.5·strength + 0.3``): for
    segmentation a strong blur would make an in-focus vessel look like the "blurred" class."""
    x = g.astype(np.float32) / 255.0
    if rng.random() < 0.8:
        gamma = float(np.exp(rng.normal(0, 0.35 * strength)))
        x = np.clip(x, 0, 1) ** gamma
    if rng.random() < 0.8:
        c = float(np.exp(rng.normal(0, 0.4 * strength)))
        b = float(rng.normal(0, 0.12 * strength))
        x = (x - x.mean()) * c + x.mean() + b
    if rng.random() < 0.3:  # low-frequency illumination gradient
        h, w = x.shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ang = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(ang) * xx / w + np.sin(ang) * yy / h)
        x = x + float(rng.normal(0, 0.1)) * ramp
    hi = 1.5 * strength + 0.3 if max_blur is None else max_blur
    if rng.random() < 0.35 and hi > 0.3:
        x = cv2.GaussianBlur(x, (0, 0), float(rng.uniform(0.3, hi)))
    if rng.random() < 0.15:  # short linear motion blur (camera shake during exposure), 2-4 px
        n = int(rng.integers(2, 5))
        k = np.zeros((2 * n + 1, 2 * n + 1), np.float32)
        ang = rng.uniform(0, np.pi)
        for t in np.linspace(-n, n, 4 * n + 1):
            k[int(round(n + t * np.sin(ang))), int(round(n + t * np.cos(ang)))] = 1.0
        x = cv2.filter2D(x, -1, k / k.sum(), borderType=cv2.BORDER_REFLECT101)
    if rng.random() < 0.6:
        x = x + rng.normal(0, rng.uniform(0.0, 0.05 * strength), x.shape).astype(np.float32)
    out = np.clip(x * 255.0, 0, 255).astype(np.uint8)
    if rng.random() < 0.35:
        q = int(rng.integers(35, 95))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    return out


def random_green(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mostly the green channel; sometimes a random channel mix (other cameras/white balance)."""
    if image.ndim == 2:
        return image
    if rng.random() < 0.7:
        return green(image)
    w = rng.dirichlet([0.5, 3.0, 0.7]).astype(np.float32)
    return np.clip(image[:, :, :3].astype(np.float32) @ w, 0, 255).astype(np.uint8)


def geometric_pair(g: np.ndarray, lab: np.ndarray, rng: np.random.Generator, out_hw: tuple[int, int],
                   scale_range: tuple[float, float] = (0.8, 1.25), rot90: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Random crop of size ``out_hw`` with flip/rot90/small rotation+shear+scale for image+labels."""
    h, w = g.shape
    oh, ow = out_hw
    s = float(np.exp(rng.uniform(np.log(scale_range[0]), np.log(scale_range[1]))))
    ang = float(rng.normal(0, 8))
    sh = float(rng.normal(0, 0.06))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    c, si = np.cos(np.deg2rad(ang)), np.sin(np.deg2rad(ang))
    M = s * np.array([[c, -si], [si, c]]) @ np.array([[1, sh], [0, 1]])
    t = np.array([ow / 2, oh / 2]) - M @ np.array([cx, cy])
    A = np.hstack([M, t[:, None]])
    gi = cv2.warpAffine(g, A, (ow, oh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    li = cv2.warpAffine(lab, A, (ow, oh), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT101)
    if rng.random() < 0.5:
        gi, li = gi[:, ::-1], li[:, ::-1]
    if rot90 and rng.random() < 0.25:
        k = 2 if oh != ow else int(rng.integers(1, 4))
        gi, li = np.rot90(gi, k), np.rot90(li, k)
    return np.ascontiguousarray(gi), np.ascontiguousarray(li)
