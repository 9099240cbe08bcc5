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
    assert "visionzip 30 frames x 17 tokens =  510 visual tokens" in result.stdout
    assert "follow-up prefilled 8 (reused" in result.stdout
    assert (tmp_path / "visionzip_tokens.png").exists()
    assert "MISMATCH" not in result.stdout
    assert (tmp_path / "contact_sheet_generated_30s.png").exists()


def test_contact_sheet_layout():
    frames = np.zeros((5, 90, 160, 3), np.uint8)
    sheet = contact_sheet(frames, [str(i) for i in range(5)], columns=3, tile_width=100)
    assert sheet.shape == (2 * (56 + 16), 300, 3)


def test_ask_prints_answer_tokens_frames_and_timings(tiny_model_dir, clip_factory, tmp_path, capsys):
    path = clip_factory("ask.mp4", frames=90, options={"g": "15"})
    model = tiny_model_dir("llava")
    saved = tmp_path / "t.safetensors"
    code = main(["ask", path, "What happens ?", "--model", model, "--budget", "130", "--dominant", "9",
                 "--contextual", "3", "--max-new-tokens", "5", "--follow-up", "and then ?", "--save-tokens", str(saved),
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    # the budget is the whole prompt + answer + the follow-up's room, counted with the template and tokenizer
    assert "plan: 5 frames x 12 tokens (9+3 per image) = 60 visual tokens; prompt 102 + answer 5 + follow-ups 13" in out
    assert "so 5 of the 90 asked frames are kept" in out
    assert "5 frames of" in out and "x 12 tokens = 60 visual tokens" in out
    assert "prefilled 102, reused 0 from the cache" in out  # planned == prefilled, to the token
    assert out.count("\nQ: ") == 2 and "reused 0 from the cache" in out
    assert "timings: load model" in out and "sample + encode + zip" in out
    assert saved.exists()
    # again from the saved tokens: no video decoding at all
    assert main(["ask", "ignored.mp4", "What happens ?", "--model", model, "--tokens", str(saved),
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert "load tokens" in capsys.readouterr().out


def test_ask_with_a_wrong_model_folder_is_one_clear_line(tmp_path, clip_factory, capsys):
    path = clip_factory("ask2.mp4", frames=10)
    assert main(["ask", path, "q", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no config.json, so not a Hugging Face model folder" in err and "Traceback" not in err
