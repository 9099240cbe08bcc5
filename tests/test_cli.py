"""The command line: demo and frames, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
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


def test_ask_checks_cheap_things_before_loading_the_model(tmp_path, clip_factory, capsys, monkeypatch):
    import comfy_visionzip.__main__ as cli

    path = clip_factory("cheap.mp4", frames=10)
    monkeypatch.setattr(cli, "load_vlm", lambda *a, **k: pytest.fail("the model was loaded"))
    cases = [
        ([path, "   "], "a question is empty"),
        ([str(tmp_path / "missing.mp4"), "q"], "missing.mp4: file not found"),
        ([path, "q", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
        ([path, "q", "--budget", "-5"], "--budget must be >= 0"),
        ([path, "q", "--tokens-per-frame", "lots"], "--tokens-per-frame must be a number of tokens or 'auto'"),
        ([path, "q", "--save-tokens", str(tmp_path / "no" / "such" / "t.safetensors")], "does not exist"),
        ([path, "q", "--save-tokens", str(tmp_path)], "is a folder"),
        ([path, "q", "--save-tokens", os.devnull], "is not a regular file"),
        ([path, "q", "--seed", "99999999999999999999"], "seed must be a whole number"),
        ([path, "q", "--device", "banana"], "unknown device 'banana'"),
        ([path, "q", "--device", "meta"], "unknown device 'meta'"),
        ([path, "q", "--dtype", "fp8"], "unknown dtype 'fp8'"),
        ([path, "q", "--temporal", "2.5"], "--temporal 2.5"),
        ([path, "q", "--method", "full", "--temporal"], "not 'full'"),
    ]
    for argv, message in cases:
        assert main(["ask", *argv, "--model", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, (argv, err)


def test_frame_plan_flag_names_are_aliases(clip_factory, capsys):
    path = clip_factory("alias.mp4", frames=40)
    assert main(["frames", path, "--frames", "4"]) == 0
    assert "indices [0, 13, 26, 39]" in capsys.readouterr().out
    from comfy_visionzip.__main__ import build_parser

    assert build_parser().parse_args(["ask", path, "q", "--model", "m", "--num-frames", "7"]).frames == 7


def test_broken_files_are_one_clear_line(tmp_path, clip_factory, capsys):
    import os

    data = open(clip_factory("cut.mp4", frames=60), "rb").read()
    assert data.find(b"moov") > data.find(b"mdat")  # not faststart: the index is at the end
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    assert main(["frames", str(tmp_path / "cut.mp4")]) == 2
    assert "truncated MP4" in capsys.readouterr().err
    os.mkfifo(tmp_path / "pipe.mp4")
    assert main(["frames", str(tmp_path / "pipe.mp4")]) == 2
    assert "is not a regular file (a FIFO" in capsys.readouterr().err


def test_a_corrupt_model_folder_is_one_clear_line(tiny_model_dir, tmp_path, clip_factory, capsys):
    import shutil

    path = clip_factory("cm.mp4", frames=10)
    for name, damage, message in [
        ("cut", lambda d: open(d / "model.safetensors", "r+b").truncate(1000),
         "model.safetensors: not a readable safetensors file"),
        ("noise", lambda d: (d / "model.safetensors").write_bytes(os.urandom(3000)), "it is truncated or corrupt"),
        ("notok", lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
         "no tokenizer files"),
    ]:
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir("llava"), folder)
        damage(folder)
        assert main(["ask", path, "q", "--model", str(folder)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_ask_shows_a_progress_bar_with_the_time_left(tiny_model_dir, clip_factory, capsys):
    path = clip_factory("bar.mp4", frames=60, options={"g": "10"})
    assert main(["ask", path, "What happens ?", "--model", tiny_model_dir("llava"), "--frames", "12",
                 "--batch-size", "3", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "sample + encode + zip" in err and "/12 [" in err and "<" in err  # tqdm: done/total [elapsed<left]
