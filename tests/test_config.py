"""Config loading: packaged defaults, extends, overrides, and one-line errors naming the key."""
import subprocess
import sys

import pytest

from nailfold.config import ConfigError, load_config


def test_packaged_default_is_uncalibrated_and_synthetic_is_calibrated():
    d = load_config()
    assert d.device.um_per_px is None and not d.device.calibrated
    assert d.endpoints.frames.startswith("tcp://127.0.0.1:")
    s = load_config("synthetic.yaml")
    assert s.device.um_per_px == 1.2 and s.stage.window_s == d.stage.window_s


def test_override_validates():
    c = load_config().with_overrides(um_per_px=1.5, fps=30)
    assert c.device.um_per_px == 1.5 and c.device.fps == 30.0
    with pytest.raises(ConfigError, match="um_per_px"):
        load_config().with_overrides(um_per_px=-1.2)


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,needle", [
    ("schema: nailfold.config/1\nextends: default.yaml\ndevice: {um_per_px: -1.2}\n", "device.um_per_px"),
    ("schema: nailfold.config/1\nextends: default.yaml\ndevice: {fps: fast}\n", "device.fps"),
    ("schema: nailfold.config/1\ndevice: {um_per_px: 1}\n", "missing config key"),
    ("schema: wrong/9\n", "schema"),
    ("device: [unclosed\n", "malformed YAML"),
    ("- just\n- a list\n", "mapping"),
    ("schema: nailfold.config/1\nextends: default.yaml\nstage: {speed_min_um_s: 5000}\n", "speed_min_um_s"),
    ("schema: nailfold.config/1\nextends: default.yaml\nmorphology: {normal_ranges: {venous_um: [17, 11]}}\n", "venous_um"),
    ("!!python/object/apply:os.system ['echo pwned']\n", "malformed YAML"),
])
def test_bad_config_names_the_problem(tmp_path, text, needle):
    p = _write(tmp_path, text)
    if "extends" in text:
        (tmp_path / "default.yaml").write_text(open(load_config().source_path).read())
    with pytest.raises(ConfigError, match=needle):
        load_config(p)


def test_cli_bad_config_one_line_error(tmp_path):
    p = _write(tmp_path, "schema: nailfold.config/1\ndevice: {um_per_px: -3}\n")
    r = subprocess.run([sys.executable, "-m", "nailfold.cli", "grab", "--config", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in r.stderr


def test_cli_help_lists_subcommands():
    r = subprocess.run([sys.executable, "-m", "nailfold.cli", "--help"], capture_output=True, text=True, timeout=60)
    for cmd in ("demo", "grab", "stage", "dashboard", "analyze", "image", "biopsy", "simulate", "train", "evaluate"):
        assert cmd in r.stdout


def test_status_lines_are_info_shown_by_default(capsys):
    """A process's startup lines (``grabbing … → …``) are INFO records of ``nailfold.status``,
    shown at the default verbosity, while other INFO records stay hidden until ``-v``."""
    import logging

    from nailfold.cli import STATUS_LOGGER, _setup_logging
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger(STATUS_LOGGER).level
    root.handlers[:] = []
    try:
        _setup_logging(0)
        logging.getLogger(STATUS_LOGGER).info("grabbing synthetic → tcp://127.0.0.1:5555")
        logging.getLogger("stream.stage").info("a detail")
        err = capsys.readouterr().err
        assert "INFO nailfold.status: grabbing synthetic" in err and "a detail" not in err
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger(STATUS_LOGGER).setLevel(saved[2])
