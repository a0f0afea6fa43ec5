"""A still image replayed as a video: nothing flows, so no loop may read "flowing".

Makes a video from one image (e.g. a real nailfold photograph): a 1024×768 crop of it (scaled
so that its shorter side fits, then centre-cropped), moved every frame by a smooth hand tremor
(``--tremor`` px: 3.1 and 4.3 Hz plus a slow drift), with fresh camera noise (``--noise`` grey
levels, Gaussian) and motion-JPEG compression, then runs ``nailfold analyze`` on it and prints
the loops by label and flow state, the white cells counted, and every loop that read "flowing"
(a false finding: the blood in a still does not move).

    python benchmarks/still_video.py IMAGE [--seconds 20] [--tremor 1.0] [--noise 4] [--um-per-px 1.2]

Exit status 1 if any loop read "flowing" or any white cell was counted.
"""
from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np


def make_video(image: np.ndarray, path: Path, seconds: float, tremor: float, noise: float,
               fps: float = 20.0, seed: int = 5) -> None:
    """Write the shaken still (MJPG, 1024×768, ``fps``) to ``path``."""
    h, w = image.shape[:2]
    s = max(1100 / w, 825 / h)
    img = cv2.resize(image, (int(round(w * s)), int(round(h * s))), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(seed)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (1024, 768))
    y0, x0 = (img.shape[0] - 768) // 2, (img.shape[1] - 1024) // 2
    for i in range(int(round(seconds * fps))):
        t = i / fps
        dx = x0 + tremor * (4 * np.sin(2 * np.pi * 3.1 * t) + 6 * np.sin(2 * np.pi * 0.2 * t))
        dy = y0 + tremor * (3 * np.sin(2 * np.pi * 4.3 * t + 1) + 5 * np.sin(2 * np.pi * 0.13 * t))
        m = np.float32([[1, 0, -dx], [0, 1, -dy]])
        f = cv2.warpAffine(img, m, (1024, 768), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if noise > 0:
            f = np.clip(f + rng.normal(0, noise, f.shape), 0, 255).astype(np.uint8)
        vw.write(f if f.ndim == 3 else cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
    vw.release()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("image")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--tremor", type=float, default=1.0, help="tremor scale (1 = ±4/±3 px at 3–4 Hz, ±6/±5 px drift)")
    ap.add_argument("--noise", type=float, default=4.0, help="camera noise SD (grey levels)")
    ap.add_argument("--um-per-px", type=float, default=1.2)
    a = ap.parse_args()
    image = cv2.imread(a.image, cv2.IMREAD_COLOR)
    if image is None:
        print(f"cannot read {a.image}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        video, report = Path(d) / "still.avi", Path(d) / "still.json"
        make_video(image, video, a.seconds, a.tremor, a.noise)
        subprocess.run([sys.executable, "-m", "nailfold.cli", "analyze", str(video), "--out", str(report),
                        "--um-per-px", str(a.um_per_px), "--no-progress", "--no-morphology"], check=True)
        rep = json.loads(report.read_text())
    caps = rep["capillaries"]
    states = collections.Counter((c["label"], c["flow_state"]) for c in caps)
    flowing = [c for c in caps if c["flow_state"] == "flowing"]
    wbc = sum(c["wbc_count"] for c in caps)
    print(f"{a.image}: {a.seconds:.0f} s still, tremor ×{a.tremor}, noise σ {a.noise}: {len(caps)} loops")
    for (label, state), n in sorted(states.items()):
        print(f"  {label:10s} {state:14s} {n}")
    for c in flowing:
        print(f"  FALSE FLOW: capillary {c['id']} ({c['label']}) {c['flow_speed_um_s']:.0f} µm/s, "
              f"confidence {c['speed_confidence']}")
    print(f"  white cells counted: {wbc} (truth 0); loops read flowing: {len(flowing)} (truth 0)")
    return 1 if flowing or wbc else 0


if __name__ == "__main__":
    sys.exit(main())
