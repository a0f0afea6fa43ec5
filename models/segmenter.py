"""Segmenter factory and the learned U-Net segmenter.

In:  image — BGR/BGRA or gray uint8, any size.
Out: ``segment(image)`` → uint8 (H, W) labels at the input's resolution: 0 background, 1 capillary,
     2 blurred capillary, 3 haemorrhage (``stream.capillary``).

``get_segmenter(name, backend)``:
- ``"classical"`` → ``models.classical.ClassicalSegmenter`` (imported lazily);
- ``"unet"`` → :class:`UNetSegmenter` from the shipped weights (missing/corrupt → ``CheckpointError``);
- ``"auto"`` → U-Net if its shipped weights load, else classical with a logged warning.

The U-Net runs at about half canonical resolution — long side ``input_long_side`` from the
checkpoint metadata (shipped: 480 px, e.g. 352×480 for 768×1024; trained at 512 with 0.6–1.5× scale
augmentation) — on the standardized green channel; logits are upsampled bilinearly to the input
size before the argmax.
Also re-exported: :func:`get_keypoint_model`, :func:`get_classifier`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from models import augment as A
from models.backends import load_model
from models.checkpoint import CheckpointError

log = logging.getLogger(__name__)


class UNetSegmenter:
    name = "unet"

    def __init__(self, backend: str = "auto", weights: str | Path | None = None):
        self.model = load_model("seg", backend, weights)
        self.long_side = int(self.model.meta.get("input_long_side", A.SEG_LONG))

    def logits(self, image: np.ndarray) -> torch.Tensor:
        """(1, 4, h, w) logits at network resolution."""
        g = A.green(np.asarray(image))
        if g.dtype != np.uint8:
            raise ValueError(f"segment() needs a uint8 image, got {g.dtype}")
        h, w = A.seg_size(g.shape, self.long_side)
        small = cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(A.standardize(small))[None, None]
        return self.model.run(x)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """(4, H, W) float32 class probabilities at the input's resolution."""
        lg = np.ascontiguousarray(self.logits(image)[0].softmax(0).permute(1, 2, 0).numpy())
        return cv2.resize(lg, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)

    def segment(self, image: np.ndarray) -> np.ndarray:
        lg = np.ascontiguousarray(self.logits(image)[0].permute(1, 2, 0).numpy())
        h, w = image.shape[:2]
        up = cv2.resize(lg, (w, h), interpolation=cv2.INTER_LINEAR)  # OpenCV: ~10× faster than torch here
        return up.argmax(2).astype(np.uint8)


def get_segmenter(name: str = "auto", backend: str = "auto", weights: str | Path | None = None):
    """Segmenter by name (``auto`` | ``classical`` | ``unet``); see module doc."""
    if name == "classical":
        from models.classical import ClassicalSegmenter
        return ClassicalSegmenter()
    if name == "unet":
        return UNetSegmenter(backend, weights)
    if name == "auto":
        try:
            return UNetSegmenter(backend, weights)
        except CheckpointError as e:
            log.warning("U-Net weights unusable (%s); using the classical segmenter", e)
            from models.classical import ClassicalSegmenter
            return ClassicalSegmenter()
    raise CheckpointError(f"unknown segmenter {name!r} (auto | classical | unet)")


def get_keypoint_model(backend: str = "auto", weights: str | Path | None = None):
    """The per-loop keypoint model (:class:`models.keypoints.KeypointModel`)."""
    from models.keypoints import KeypointModel
    return KeypointModel(backend, weights)


def get_classifier(backend: str = "auto", weights: str | Path | None = None):
    """The per-loop morphology classifier (:class:`models.classifier.Classifier`)."""
    from models.classifier import Classifier
    return Classifier(backend, weights)
