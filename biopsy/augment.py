"""Online augmentation for biopsy training (paper: translation ±100 px, rotation ±10°,
shear ±5°, 90° orientations, flips, 800×800 crops).

In:  image H×W×3 uint8, a list of H×W masks (uint8/bool), a numpy Generator, crop size (px).
Out: (image crop, mask crops) of ``c×c`` px, c = min(crop, H, W). Images are warped bilinearly, masks by
nearest neighbour; pixels warped in from outside are reflected (so crops never show black).
For CPU training the crop is smaller than the paper's 800 px (e.g. 192–256 px): stated in
docs/biopsy.md.
"""
from __future__ import annotations

import math

import cv2
import numpy as np


def affine_matrix(rng: np.random.Generator, shape: tuple[int, int], translate: float = 100.0,
                  rotate_deg: float = 10.0, shear_deg: float = 5.0) -> np.ndarray:
    """2×3 matrix: rotation ±rotate_deg and shear ±shear_deg about the centre, then shift ±translate px."""
    h, w = shape
    a = math.radians(rng.uniform(-rotate_deg, rotate_deg))
    s = math.tan(math.radians(rng.uniform(-shear_deg, shear_deg)))
    R = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    S = np.array([[1.0, s], [0.0, 1.0]])
    A = R @ S
    c = np.array([w / 2, h / 2])
    t = c - A @ c + rng.uniform(-translate, translate, 2)
    return np.hstack([A, t[:, None]]).astype(np.float64)


def augment(image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator, crop: int,
            translate: float = 100.0, rotate_deg: float = 10.0, shear_deg: float = 5.0) -> tuple[np.ndarray, list[np.ndarray]]:
    h, w = image.shape[:2]
    M = affine_matrix(rng, (h, w), translate, rotate_deg, shear_deg)
    img = cv2.warpAffine(image, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    ms = [cv2.warpAffine(m.astype(np.uint8), M, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT101)
          for m in masks]
    k = int(rng.integers(4))
    if k:
        img = np.rot90(img, k)
        ms = [np.rot90(m, k) for m in ms]
    if rng.random() < 0.5:
        img = img[:, ::-1]
        ms = [m[:, ::-1] for m in ms]
    H, W = img.shape[:2]
    ch = cw = min(crop, H, W)  # square, so batches stack whatever the orientation
    y0 = int(rng.integers(0, H - ch + 1))
    x0 = int(rng.integers(0, W - cw + 1))
    img = np.ascontiguousarray(img[y0:y0 + ch, x0:x0 + cw])
    ms = [np.ascontiguousarray(m[y0:y0 + ch, x0:x0 + cw]) for m in ms]
    return img, ms


def photometric(image: np.ndarray, rng: np.random.Generator, blur_max: float = 2.0,
                jpeg: bool = True) -> np.ndarray:
    """Random stain / acquisition change of a BGR uint8 image (labels unchanged): channel
    permutation (other stain hues), per-channel and global gain, brightness, gamma, sometimes
    grayscale, Gaussian blur (σ ≤ ``blur_max`` px), noise and JPEG re-encoding (quality 20–95).
    Makes the networks less dependent on the synthetic generator's colours and quality."""
    img = image.astype(np.float32) / 255.0
    if rng.random() < 0.3:
        img = img[..., rng.permutation(3)]
    img = img * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    m = img.mean()
    img = (img - m) * rng.uniform(0.6, 1.4) + m + rng.uniform(-0.08, 0.08)
    img = np.clip(img, 0, 1) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.1:
        img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
    if blur_max > 0 and rng.random() < 0.4:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, blur_max))
    if rng.random() < 0.5:
        img = img + rng.normal(0, rng.uniform(0.0, 0.06), img.shape).astype(np.float32)
    out = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    if jpeg and rng.random() < 0.5:
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(20, 96))])
        out = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(out)
