"""Frame sources for recordings other than 8-bit video: 16-bit frames, multi-page TIFF stacks."""
import cv2
import numpy as np
import pytest

from nailfold.errors import InputError
from nailfold.images import data_depth, to_8bit
from stream.sources import TiffStackSource, is_tiff_stack, open_source


def _frames(n=5, shape=(48, 64), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("top, depth", [(0, 8), (255, 8), (256, 10), (1023, 10), (1024, 12), (4095, 12),
                                        (9000, 14), (16383, 14), (16384, 16), (65535, 16)])
def test_data_depth_follows_the_largest_value(top, depth):
    img = np.zeros((4, 4), np.uint16)
    img[1, 2] = top
    assert data_depth(img) == depth
    if top > 1:
        assert data_depth(img.astype(np.float32)) == depth      # counts stored as floats
    assert to_8bit(img, depth)[1, 2] == top >> (depth - 8)


def test_float_frames_normalised_or_counts_read_as_8_bit(tmp_path):
    # ImageJ and other tools save 32-bit float stacks: normalised (0…1) or counts (here 12-bit)
    frames = _frames(n=3)
    for name, scale in (("norm.tif", 1 / 255.0), ("counts.tif", 16.0)):
        p = tmp_path / name
        assert cv2.imwritemulti(str(p), [f.astype(np.float32) * np.float32(scale) for f in frames])
        got = [fr.image for fr in open_source(f"file:{p}", pace="max")]
        assert len(got) == 3
        for g, f in zip(got, frames):
            np.testing.assert_array_equal(g, f)
    nan = np.full((8, 8), np.nan, np.float32)
    assert data_depth(nan) == 0 and not to_8bit(nan, 0).any()


def test_a_folder_of_12_bit_frames_reads_as_the_8_bit_frames(tmp_path):
    # 12-bit data in 16-bit PNGs (values 0–4095): one shift for the whole folder, taken from its
    # first frame, so a darker later frame is scaled like the others. A fixed >> 8 made them
    # 0–15: "video is blank"
    frames = _frames()
    frames[3] = frames[3] // 4                  # a darker frame
    for i, f in enumerate(frames):
        cv2.imwrite(str(tmp_path / f"f_{i}.png"), f.astype(np.uint16) * 16 + 9)
    src = open_source(str(tmp_path), pace="max")
    got = [fr.image for fr in src]
    assert len(got) == 5 and all(g.dtype == np.uint8 for g in got)
    for g, f in zip(got, frames):
        np.testing.assert_array_equal(g, f)


def test_a_multi_page_tiff_is_a_recording(tmp_path):
    frames = _frames(n=37)       # more than one read's chunk of pages
    p = tmp_path / "stack.tif"
    assert cv2.imwritemulti(str(p), [f.astype(np.uint16) << 6 for f in frames])   # 14-bit data
    assert is_tiff_stack(p)
    src = open_source(f"file:{p}", pace="max", fps=25.0)
    assert isinstance(src, TiffStackSource)
    assert (src.n_frames, src.shape, src.fps) == (37, (48, 64), 25.0)
    got = list(src)
    assert [fr.meta.seq for fr in got] == list(range(37))
    for fr, f in zip(got, frames):
        np.testing.assert_array_equal(fr.image, f)
    # a one-page TIFF stays an image (a still for `nailfold image`, or a one-frame video)
    single = tmp_path / "one.tif"
    cv2.imwrite(str(single), frames[0])
    assert not is_tiff_stack(single)


def test_a_truncated_tiff_stack_gives_its_whole_pages_and_a_fake_one_a_clear_error(tmp_path):
    # a recording cut short (disk full, copy interrupted): the pages still whole are read, in order
    frames = _frames(n=40, shape=(96, 128))
    p = tmp_path / "stack.tif"
    assert cv2.imwritemulti(str(p), frames)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    got = [fr.image for fr in open_source(f"file:{p}", pace="max")]
    assert 10 <= len(got) < 40
    for g, f in zip(got, frames):
        np.testing.assert_array_equal(g, f)
    fake = tmp_path / "notes.tif"
    fake.write_bytes(b"II*\x00" + b"not really a tiff" * 20)
    with pytest.raises(InputError):
        open_source(f"file:{fake}", pace="max")


def test_analyze_reads_a_12_bit_tiff_stack_at_the_configured_rate(tmp_path):
    from nailfold.config import load_config
    from stream.analyze import _open
    p = tmp_path / "rec.tiff"
    assert cv2.imwritemulti(str(p), [f.astype(np.uint16) << 4 for f in _frames(n=3)])
    src = _open(p, None, load_config())
    assert src.fps == load_config().device.fps and src.n_frames == 3


def test_a_16_bit_still_is_scaled_by_its_depth(tmp_path):
    from stream.image_cli import read_image
    g = _frames(n=1, shape=(64, 80))[0]
    p = tmp_path / "still.png"
    cv2.imwrite(str(p), g.astype(np.uint16) << 4)        # 12-bit data
    img = read_image(str(p))
    assert img.shape == (64, 80, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[:, :, 1], g)


def test_batch_takes_a_tiff_stack_for_a_recording_and_a_one_page_tiff_for_a_still(tmp_path):
    from stream.batch import find_jobs
    frames = _frames(n=3)
    assert cv2.imwritemulti(str(tmp_path / "rec.tif"), frames)
    cv2.imwrite(str(tmp_path / "still.tif"), frames[0])
    kinds = {j.path.split("/")[-1]: j.kind for j in find_jobs(tmp_path, tmp_path / "out")}
    assert kinds == {"rec.tif": "video", "still.tif": "image"}


def test_a_frame_of_another_size_stops_a_folder_or_stack_with_a_clear_error(tmp_path):
    frames = _frames(n=3)
    folder = tmp_path / "rec"
    folder.mkdir()
    for i, f in enumerate(frames + [_frames(n=1, shape=(40, 64))[0]]):
        cv2.imwrite(str(folder / f"f{i}.png"), f)
    got = []
    with pytest.raises(InputError, match="f3.png: size"):
        for fr in open_source(str(folder), pace="max"):
            got.append(fr)
    assert len(got) == 3


def test_a_16_bit_gray_video_is_scaled_by_its_data_depth(tmp_path):
    # FFV1 gray16 holding 12-bit data: OpenCV's 8-bit conversion kept the top byte (0–15)
    frames = _frames(n=4, shape=(48, 64))
    p = tmp_path / "rec16.mkv"
    w = cv2.VideoWriter(str(p), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), 20.0, (64, 48),
                        [cv2.VIDEOWRITER_PROP_DEPTH, cv2.CV_16U, cv2.VIDEOWRITER_PROP_IS_COLOR, 0])
    if not w.isOpened():
        pytest.skip("this OpenCV cannot write 16-bit FFV1")
    for f in frames:
        w.write(f.astype(np.uint16) << 4)
    w.release()
    src = open_source(f"file:{p}", pace="max")
    for got in ([fr.image for fr in src], [fr.image for fr in open_source(f"file:{p}", pace="max").gray_frames()]):
        assert len(got) == 4
        for g, f in zip(got, frames):
            np.testing.assert_array_equal(g, f)


def test_a_float_still_reads_as_8_bit(tmp_path):
    from stream.image_cli import read_image
    g = _frames(n=1, shape=(64, 80))[0]
    p = tmp_path / "still.tif"
    assert cv2.imwrite(str(p), g.astype(np.float32) / np.float32(255))
    img = read_image(str(p))
    assert img.shape == (64, 80, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[:, :, 1], g)


def test_a_16_bit_fluorescence_biopsy_image_reads_as_8_bit(tmp_path):
    from biopsy.data import read_image
    g = _frames(n=1, shape=(64, 80))[0]
    p = tmp_path / "if.tif"
    cv2.imwrite(str(p), g.astype(np.uint16) * 256 + 255)         # 16-bit data
    img = read_image(p)
    assert img.dtype == np.uint8 and img.shape == (64, 80, 3)
    np.testing.assert_array_equal(img[:, :, 0], g)
    with pytest.raises(InputError):
        read_image(tmp_path / "missing.tif")


def test_a_frame_rate_not_stored_is_assumed_from_the_config_and_said(tmp_path):
    # speeds scale with the frame rate: an image folder or a plain TIFF stack states none, so the
    # report says which was assumed; an ImageJ stack's frame interval is read
    import tifffile
    from nailfold.config import load_config
    from stream.analyze import _open, analyze_video
    from stream.sources import tiff_frame_rate
    frames = np.stack(_frames(n=12, shape=(64, 96))).astype(np.uint16) << 4
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(str(ij), frames, imagej=True, metadata={"axes": "TYX", "finterval": 1 / 30})
    assert tiff_frame_rate(ij) == pytest.approx(30.0)
    src = _open(ij, None, load_config())
    assert src.fps == pytest.approx(30.0) and not src.fps_assumed
    plain = tmp_path / "plain.tif"
    assert cv2.imwritemulti(str(plain), list(frames))
    assert tiff_frame_rate(plain) is None
    cfg = load_config()
    rep = analyze_video(plain, cfg, progress=False, keyframe_thread=False)
    assert rep.fps == cfg.device.fps
    assert any(w.startswith(f"the input states no frame rate: {cfg.device.fps:g} fps assumed") for w in rep.warnings)
    rep = analyze_video(plain, cfg, fps=25.0, progress=False, keyframe_thread=False)
    assert rep.fps == 25.0 and not any("no frame rate" in w for w in rep.warnings)
