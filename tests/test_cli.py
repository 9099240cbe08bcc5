"""The command line: demo and frames, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from comfy_visionzip.__main__ import main
from comfy_visionzip.viz import contact_sheet


def test_frames_writes_a_contact_sheet(clip_factory, tmp_path, capsys):
    path = clip_factory("cli.mp4", frames=40)
    out = tmp_path / "sheet.png"
    assert main(["frames", path, "--num-frames", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 frames" in text and "indices [0, 13, 26, 39]" in text
    image = np.asarray(Image.open(out))
    assert image.ndim == 3 and image.shape[1] == 3 * 240  # four tiles: a row of three, then one


def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path, capsys):
    assert main(["frames", str(tmp_path / "nope.mp4"), "--num-frames", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.mp4: file not found" in err and "Traceback" not in err


def test_demo_runs_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, "-m", "comfy_visionzip", "demo", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("frame numbers drawn in the frames: OK") == 4
    assert "MISMATCH" not in result.stdout
    assert (tmp_path / "contact_sheet_generated_30s.png").exists()


def test_contact_sheet_layout():
    frames = np.zeros((5, 90, 160, 3), np.uint8)
    sheet = contact_sheet(frames, [str(i) for i in range(5)], columns=3, tile_width=100)
    assert sheet.shape == (2 * (56 + 16), 300, 3)
