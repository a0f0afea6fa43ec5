"""Frame sources behind one small interface.

A source is an iterable of :class:`stream.frames.Frame` with attributes ``name``, ``fps``
(frames/s, nominal) and ``shape`` ((h, w) or (h, w, c)), plus ``close()``. Open one with
:func:`open_source` from a spec string:

- ``camera:N`` or ``camera:URL`` — OpenCV ``VideoCapture``; asks for 1024×768 @ 20 fps and
  reports (logs, and in ``fps``/``shape``) what the device actually gives.
- ``file:PATH`` — a video OpenCV/FFmpeg reads (mkv, mp4, avi…), a multi-page TIFF (one frame a
  page, as microscopy cameras record) or a folder of images (png/jpg/tif/bmp, natural sort
  order). 16-bit frames (10-, 12-, 14- or 16-bit data: 16-bit images, TIFF pages, gray16 video)
  and float frames (counts, or normalised 0…1) are brought to 8 bits by one scale per source,
  chosen from its first frame's data depth (:func:`nailfold.images.data_depth`,
  :func:`nailfold.images.to_8bit`), so every frame is scaled alike. ``pace="realtime"`` replays at the file's fps on the
  wall clock (a recording replayed as a live stream); ``pace="max"`` as fast as possible.
  ``loop=True`` restarts at the end (sequence numbers keep increasing).
- ``synthetic`` or ``synthetic:seed=3,loops=8,jitter=2,...`` — the embedded synthetic
  capillaroscope (:mod:`stream.synthetic`), paced at its fps unless ``pace="max"``.

Every frame is a freshly allocated uint8 array (safe for zero-copy sending). Errors opening a
source (missing file, not a video, no frames, camera absent) raise
:class:`nailfold.errors.InputError` with a one-line message.
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from nailfold.errors import InputError
from nailfold.images import as_8bit, data_depth
from stream.frames import DEFAULT_HEIGHT, DEFAULT_WIDTH, Frame, FrameMeta, to_gray

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
MAX_SIDE = 8192
GRAY16_FORMATS = (b"Y1\x00\x10", b"\x10\x001Y")   # FFmpeg's gray16le / gray16be (CAP_PROP_CODEC_PIXEL_FORMAT)


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def _check_image(img: np.ndarray, where: str, depth: int | None = None) -> np.ndarray:
    """``img`` as the uint8 gray (H, W) or BGR (H, W, 3) frame sources yield, or
    :class:`InputError`. uint16 and float pixels are brought to 8 bits by
    :func:`nailfold.images.as_8bit` at ``depth`` (default: that of ``img``; a source passes its
    first frame's)."""
    if img is None:
        raise InputError(f"{where}: cannot decode image")
    img = as_8bit(img, where, depth)
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise InputError(f"{where}: unsupported image shape {img.shape}")
    if not (1 <= img.shape[0] <= MAX_SIDE and 1 <= img.shape[1] <= MAX_SIDE):
        raise InputError(f"{where}: absurd resolution {img.shape[1]}x{img.shape[0]}")
    return np.ascontiguousarray(img)


def _read_next(source, into: np.ndarray | None = None) -> np.ndarray | None:
    """Next image of an OpenCV capture source: the frame read (and checked) at open time first,
    then ``source._cap.read()`` (decoding into ``into`` if given and of the frame's size and
    type, else into a new array); None when the capture has no more frames."""
    if source._first is not None:
        img, source._first = source._first, None
        return img
    ok, raw = source._cap.read(into) if into is not None else source._cap.read()
    return _check_image(raw, source.name, getattr(source, "_depth", None)) if ok else None


class _Pacer:
    """Sleeps so that frame k is released at ``t0 + k / fps`` (wall clock); no-op for ``max``."""

    def __init__(self, fps: float, pace: str):
        if pace not in ("realtime", "max"):
            raise InputError(f"pace must be 'realtime' or 'max', got {pace!r}")
        self.period = 1.0 / fps if pace == "realtime" else 0.0
        self.t0: float | None = None
        self.k = 0

    def wait(self) -> None:
        if self.period <= 0:
            return
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        target = self.t0 + self.k * self.period
        if target > now:
            time.sleep(target - now)
        elif now - target > 1.0:  # fell far behind (suspended?) — re-anchor instead of bursting
            self.t0, self.k = now, 0
        self.k += 1


class VideoFileSource:
    """Frames of a video file (any container/codec OpenCV's FFmpeg backend reads)."""

    def __init__(self, path: str | os.PathLike, *, pace: str = "max", loop: bool = False,
                 stream_id: str = "scope0", fps: float | None = None, decode_threads: int | str | None = None):
        self.path = Path(path)
        # FFmpeg's decoding threads: None = its default (one per core); "auto" = one for motion
        # JPEG, the default for other codecs (see _open)
        self.decode_threads = decode_threads
        if not self.path.exists():
            raise InputError(f"video file not found: {self.path}")
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise InputError(f"video file is empty (0 bytes): {self.path}")
        self.name = f"file:{self.path}"
        self.stream_id, self.loop = stream_id, loop
        self._cap = self._open()
        ok, first = self._cap.read()
        if not ok or first is None:
            self._cap.release()
            raise InputError(f"not a readable video (no frame decodes): {self.path}")
        self._depth = _source_depth(first, self.name)
        self._first: np.ndarray | None = _check_image(first, str(self.path), self._depth)
        file_fps = self._cap.get(cv2.CAP_PROP_FPS)
        stored = float(file_fps) if file_fps and 0 < file_fps < 1000 else None
        self.fps = float(fps) if fps else (stored or 20.0)
        self.fps_assumed = not fps and stored is None   # the file states no usable frame rate
        self.shape = self._first.shape
        n = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.n_frames = n if n > 0 else None
        self._pacer = _Pacer(self.fps, pace)

    def _open(self) -> cv2.VideoCapture:
        threads = self.decode_threads
        cap = self._capture(None if threads == "auto" else threads)
        if threads == "auto":
            # one thread for motion JPEG (≈ 1.5 ms a 1024×768 frame: a reader thread keeps up);
            # FFmpeg's own threads for every other codec: FFV1 (what `nailfold simulate` and the
            # recorder write) takes ≈ 38 ms of CPU a frame, 20 ms of wall time on two threads
            fourcc = int(cap.get(cv2.CAP_PROP_FOURCC) or 0).to_bytes(4, "little").decode("latin-1").upper()
            if fourcc in ("MJPG", "MJPA", "AVRN", "JPEG"):
                cap.release()
                cap = self._capture(1)
        return cap

    def _capture(self, threads: int | None) -> cv2.VideoCapture:
        params = [] if threads is None else [cv2.CAP_PROP_N_THREADS, int(threads)]
        cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise InputError(f"not a video OpenCV/FFmpeg can open: {self.path}")
        # 16-bit gray video (FFV1 / raw gray16, as scientific cameras record 10–14-bit data):
        # OpenCV's conversion to 8-bit colour keeps the top byte, so 12-bit data came out 0–15
        # ("video is blank"); read the 16-bit values and shift them by the data's depth instead
        fmt = (int(cap.get(cv2.CAP_PROP_CODEC_PIXEL_FORMAT) or 0) & 0xFFFFFFFF).to_bytes(4, "little")
        cap.set(cv2.CAP_PROP_CONVERT_RGB, 0 if fmt in GRAY16_FORMATS else 1)
        return cap

    def __iter__(self) -> Iterator[Frame]:
        return self._frames(gray=False)

    def gray_frames(self) -> Iterator[Frame]:
        """The frames of :meth:`__iter__` reduced to the gray plane the analysis uses
        (:func:`stream.frames.to_gray`: uint8 (H, W), a new array each), the colour image
        decoded into one reused buffer. A new 1024×768×3 array per frame costs its page faults:
        benchmark clip (MJPG, one decoding thread), 2.0 → 1.85 ms of CPU per frame, the same
        pixels."""
        return self._frames(gray=True)

    def _frames(self, gray: bool) -> Iterator[Frame]:
        seq = 0
        buf = None
        while True:
            img = _read_next(self, buf)
            if img is None:
                if self.loop and seq > 0:
                    self._cap.release()
                    self._cap = self._open()
                    continue
                return
            if img.shape != self.shape:
                log.warning("%s: frame %d has shape %s != %s; skipped", self.path, seq, img.shape, self.shape)
                continue
            if gray:
                g = to_gray(img)
                if g is img:       # a plane of its own: the buffer is read into again
                    g = g.copy()
                elif img.ndim == 3:
                    buf = img
                img = g
            self._pacer.wait()
            yield Frame(FrameMeta(seq, time.time(), self.fps, img.shape, self.stream_id), img)
            seq += 1

    def close(self) -> None:
        self._cap.release()


class _ImageSequence:
    """Base of the sources that read one image a frame (a folder, a TIFF stack): the subclass sets
    ``shape``, ``fps``, ``stream_id``, ``loop``, ``_pacer`` and yields ``(where, image)`` in order
    from ``_images()``; a frame of another size stops the source with an :class:`InputError`."""

    def _images(self) -> Iterator[tuple[str, np.ndarray]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Frame]:
        seq = 0
        while True:
            for where, img in self._images():
                if img.shape != self.shape:
                    raise InputError(f"{where}: size {img.shape} differs from the first frame's {self.shape}")
                self._pacer.wait()
                yield Frame(FrameMeta(seq, time.time(), self.fps, img.shape, self.stream_id), img)
                seq += 1
            if not self.loop:
                return

    def close(self) -> None:
        pass


class ImageFolderSource(_ImageSequence):
    """Frames from a folder of images, in natural sort order (frame_2 before frame_10)."""

    def __init__(self, folder: str | os.PathLike, *, pace: str = "max", loop: bool = False,
                 stream_id: str = "scope0", fps: float | None = None):
        self.folder = Path(folder)
        self.files = sorted((p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_EXTS), key=_natural_key)
        if not self.files:
            raise InputError(f"folder holds no images ({', '.join(sorted(IMAGE_EXTS))}): {self.folder}")
        self.name = f"file:{self.folder}"
        self.stream_id, self.loop = stream_id, loop
        self.fps = float(fps) if fps else 20.0
        self.fps_assumed = not fps      # images carry no frame rate
        raw = cv2.imread(str(self.files[0]), cv2.IMREAD_UNCHANGED)
        self._depth = _source_depth(raw, self.name)
        self.shape = _check_image(raw, str(self.files[0]), self._depth).shape
        self.n_frames = len(self.files)
        self._pacer = _Pacer(self.fps, pace)

    def _read(self, p: Path) -> np.ndarray:
        return _check_image(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), str(p), self._depth)

    def _images(self) -> Iterator[tuple[str, np.ndarray]]:
        for p in self.files:
            yield str(p), self._read(p)


def _source_depth(first: np.ndarray | None, name: str) -> int | None:
    """A source's data depth (:func:`data_depth`) from its first frame (None for 8-bit frames), logged."""
    if first is None or not (first.dtype == np.uint16 or first.dtype.kind == "f"):
        return None
    depth = data_depth(first)
    log.info("%s: %s frames holding %s data: scaled to 8 bits alike", name,
             "16-bit" if first.dtype == np.uint16 else str(first.dtype),
             "0…1 (normalised)" if depth == 0 else f"{depth}-bit")
    return depth


def is_tiff_stack(path: str | os.PathLike) -> bool:
    """``path`` is a TIFF file of more than one page (a recording, one frame a page)."""
    p = Path(path)
    if p.suffix.lower() not in (".tif", ".tiff") or not p.is_file():
        return False
    try:
        return cv2.imcount(str(p)) > 1
    except cv2.error:
        return False


def tiff_frame_rate(path: str | os.PathLike) -> float | None:
    """The frame rate an ImageJ TIFF stack states (``finterval`` s, or ``fps``, in its ImageJ
    metadata), or None (not ImageJ, none stated, or unreadable)."""
    try:
        import tifffile
        with tifffile.TiffFile(str(path)) as tf:
            md = tf.imagej_metadata or {}
    except Exception:       # no tifffile, not a TIFF it can parse: the rate is simply unknown
        return None
    try:
        if md.get("finterval"):
            rate = 1.0 / float(md["finterval"])
        else:
            rate = float(md.get("fps") or 0)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return rate if 0 < rate < 1000 else None


class TiffStackSource(_ImageSequence):
    """Frames from the pages of a multi-page TIFF, read a few pages at a time."""

    CHUNK = 16   # pages decoded per read (cv2.imreadmulti seeks to a page without decoding the others)

    def __init__(self, path: str | os.PathLike, *, pace: str = "max", loop: bool = False,
                 stream_id: str = "scope0", fps: float | None = None):
        self.path = Path(path)
        self.name = f"file:{self.path}"
        self.stream_id, self.loop = stream_id, loop
        stored = tiff_frame_rate(self.path)
        self.fps = float(fps) if fps else (stored or 20.0)
        self.fps_assumed = not fps and stored is None
        try:
            self.n_frames = int(cv2.imcount(str(self.path)))
            ok, first = cv2.imreadmulti(str(self.path), 0, 1, flags=cv2.IMREAD_UNCHANGED)
        except cv2.error as e:
            raise InputError(f"not a readable TIFF: {self.path} ({e})") from None
        if not ok or not first or self.n_frames < 1:
            raise InputError(f"not a readable TIFF (no page decodes): {self.path}")
        self._depth = _source_depth(first[0], self.name)
        self.shape = _check_image(first[0], f"{self.path} page 0", self._depth).shape
        self._pacer = _Pacer(self.fps, pace)

    def _images(self) -> Iterator[tuple[str, np.ndarray]]:
        for start in range(0, self.n_frames, self.CHUNK):
            count = min(self.CHUNK, self.n_frames - start)
            try:
                ok, pages = cv2.imreadmulti(str(self.path), start, count, flags=cv2.IMREAD_UNCHANGED)
            except cv2.error as e:
                raise InputError(f"{self.path}: page {start} cannot be read ({e})") from None
            if not ok or len(pages) != count:
                raise InputError(f"{self.path}: page {start + len(pages or ())} cannot be read")
            for k, raw in enumerate(pages):
                where = f"{self.path} page {start + k}"
                yield where, _check_image(raw, where, self._depth)


class CameraSource:
    """A live camera through OpenCV; requests 1024×768 @ 20 fps and reports what it gets."""

    def __init__(self, device: str, *, stream_id: str = "scope0", width: int = DEFAULT_WIDTH,
                 height: int = DEFAULT_HEIGHT, fps: float = 20.0):
        index: int | str = int(device) if device.isdigit() else device
        self._cap = cv2.VideoCapture(index)
        if not self._cap.isOpened():
            self._cap.release()
            raise InputError(f"camera {device!r} cannot be opened (not connected, or in use?)")
        self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self._cap.set(cv2.CAP_PROP_FPS, fps)
        ok, first = self._cap.read()
        if not ok:
            self._cap.release()
            raise InputError(f"camera {device!r} opened but delivers no frames")
        self._first: np.ndarray | None = _check_image(first, f"camera:{device}")
        got_fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(got_fps) if got_fps and got_fps > 0 else fps
        self.shape = self._first.shape
        self.name = f"camera:{device}"
        self.stream_id = stream_id
        self.n_frames = None
        if (self.shape[1], self.shape[0]) != (width, height) or abs(self.fps - fps) > 0.5:
            log.warning("camera %s gives %dx%d @ %.1f fps (asked %dx%d @ %.1f)", device, self.shape[1],
                        self.shape[0], self.fps, width, height, fps)

    def __iter__(self) -> Iterator[Frame]:
        seq = 0
        while True:
            img = _read_next(self)
            if img is None:
                log.error("%s: read failed; stopping", self.name)
                return
            yield Frame(FrameMeta(seq, time.time(), self.fps, img.shape, self.stream_id), img)
            seq += 1

    def close(self) -> None:
        self._cap.release()


def parse_synthetic_options(opts: str) -> dict:
    """``"seed=3,loops=8,jitter=2"`` → SimParams keyword arguments (typed, validated)."""
    from stream.synthetic import SimParams  # lazy: heavy module

    aliases = {"loops": "n_loops", "jitter": "jitter_px", "noise": "noise_sigma", "blur": "blur_sigma",
               "um": "um_per_px", "seconds": "duration_s", "wbc": "wbc_rate_per_min", "rotation": "rotation_deg"}
    fields = SimParams.__dataclass_fields__
    out: dict = {}
    for item in filter(None, (s.strip() for s in opts.split(","))):
        if "=" not in item:
            raise InputError(f"synthetic option {item!r} must be key=value")
        k, v = (s.strip() for s in item.split("=", 1))
        k = aliases.get(k, k)
        if k not in fields or k in ("class_mix", "speed_range_um_s"):
            raise InputError(f"unknown synthetic option {k!r}")
        default = fields[k].default
        try:
            if isinstance(default, bool):
                out[k] = v.lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int) or k in ("n_loops", "seed", "width", "height"):
                out[k] = int(v)
            elif isinstance(default, float):
                out[k] = float(v)
            else:
                out[k] = v
        except ValueError:
            raise InputError(f"synthetic option {k}={v!r} is not a valid number") from None
    return out


class SyntheticSource:
    """The embedded synthetic capillaroscope as an endless (or ``duration_s``-long) stream."""

    def __init__(self, params=None, *, pace: str = "realtime", stream_id: str = "scope0",
                 endless: bool = True):
        from stream.synthetic import SimParams, SyntheticScope

        self.scope = SyntheticScope(params or SimParams())
        p = self.scope.params
        self.fps = float(p.fps)
        self.shape = self.scope.frame(0).shape
        self.name = f"synthetic:seed={p.seed}"
        self.stream_id = stream_id
        self.endless = endless
        self.n_frames = None if endless else self.scope.n_frames
        self._pacer = _Pacer(self.fps, pace)

    def __iter__(self) -> Iterator[Frame]:
        i = 0
        while self.endless or i < self.scope.n_frames:
            img = self.scope.frame(i)
            self._pacer.wait()
            yield Frame(FrameMeta(i, time.time(), self.fps, img.shape, self.stream_id), img)
            i += 1

    def close(self) -> None:
        pass


def open_source(spec: str, *, pace: str = "realtime", loop: bool = False, stream_id: str = "scope0",
                fps: float | None = None, decode_threads: int | str | None = None):
    """Open a frame source from a spec string (see module docstring). ``decode_threads`` limits
    FFmpeg's threads for a video file (offline analysis runs its own threads on every core;
    ``"auto"``: one for motion JPEG, FFmpeg's default for other codecs)."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from stream.synthetic import SimParams

        kw = parse_synthetic_options(spec.partition(":")[2])
        endless = "duration_s" not in kw
        return SyntheticSource(SimParams(**kw), pace=pace, stream_id=stream_id, endless=endless)
    if spec.startswith("camera:"):
        return CameraSource(spec.partition(":")[2], stream_id=stream_id)
    path = spec[5:] if spec.startswith("file:") else spec
    p = Path(path)
    if not p.exists():
        raise InputError(f"source not found: {path} (expected camera:N, file:PATH or synthetic)")
    if p.is_dir():
        return ImageFolderSource(p, pace=pace, loop=loop, stream_id=stream_id, fps=fps)
    if is_tiff_stack(p):
        return TiffStackSource(p, pace=pace, loop=loop, stream_id=stream_id, fps=fps)
    return VideoFileSource(p, pace=pace, loop=loop, stream_id=stream_id, fps=fps, decode_threads=decode_threads)
