"""The library's words: every count in a summary, plan line or note is of the thing its word names and the
parts add up (LLaVA: one image per frame, anyres crops, newline tokens; Qwen: temporal patches of two frames,
an odd last frame repeated); "1 frame", never "1 frames"; a kernel the install cannot run is named before
anything loads; the command line runs from ComfyUI's folder; relative paths said to start where they do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from comfy_visionzip import VisionZipError, sample_video
from comfy_visionzip import vlm as vlm_module
from comfy_visionzip.answer import Chat, GenerationConfig
from comfy_visionzip.budget import plan_budget
from comfy_visionzip.pipeline import compress_frames, compress_video, label_tokens
from comfy_visionzip.store import load_tokens, save_tokens
from comfy_visionzip.temporal import Temporal, fit
from comfy_visionzip.video.probe import open_container
from comfy_visionzip.vlm import check_attention, load_tower, load_vlm
from comfy_visionzip.words import counted, frames_as_units, part_of

REPO = Path(__file__).resolve().parents[1]
QWEN3 = pytest.mark.skipif(not hasattr(transformers, "Qwen3VLForConditionalGeneration"),
                           reason="this transformers has no Qwen3-VL")
QWEN = ["qwen2_5_vl", pytest.param("qwen3_vl", marks=QWEN3)]
QUESTION = "What is in this video ?"


@pytest.fixture(scope="module")
def clip(clip_factory):
    return clip_factory("messages.mp4", frames=60, size=(160, 120))


@pytest.fixture(scope="module")
def small_clip(clip_factory):  # Qwen's tiny tower: 20 merged tokens a frame, fewer than 54+10
    return clip_factory("messages-small.mp4", frames=30, size=(64, 48))


def _head(summary: str) -> str:
    return summary.split("; prompt")[0]


def test_counts_in_words():
    assert [counted(n, "frame") for n in (0, 1, 2)] == ["0 frames", "1 frame", "2 frames"]
    assert counted(1, "temporal patch") == "1 temporal patch" and counted(3, "temporal patch") == "3 temporal patches"
    assert frames_as_units(7, 1) == "7 frames"
    assert frames_as_units(8, 2) == "8 frames = 4 temporal patches of 2 frames"
    assert frames_as_units(7, 2) == "7 frames = 4 temporal patches of 2 frames (the last frame repeated)"
    assert frames_as_units(1, 2, " of a.mp4") == ("1 frame of a.mp4 = 1 temporal patch of 2 frames "
                                                  "(the last frame repeated)")
    assert part_of(5, 30, 5, 30, 1) == "5 of 30 frames"
    assert part_of(3, 8, 5, 15, 2) == "3 of 8 temporal patches (5 of 15 frames)"


# ---- the plan line (before anything is decoded)

@pytest.mark.parametrize("family, head", [
    ("llava", "7 frames x 16 tokens (14+2 per image) = 112 visual tokens"),
    # anyres: 5 images of 16 tokens and a newline per frame; 7 x 81 = 560 visual tokens + 7 newlines
    ("llava_next", "7 frames x 81 tokens (5 images x 16 (14+2) + 1 newline) = 560 visual tokens + 7 newlines"),
    ("llava_onevision", "7 frames x 16 tokens (14+2 per image) = 112 visual tokens + 1 closing newline"),
    ("qwen2_5_vl", "7 frames = 4 temporal patches of 2 frames (the last frame repeated) x 16 tokens "
                   "(14+2 per temporal patch) = 64 visual tokens"),
    pytest.param("qwen3_vl", "7 frames = 4 temporal patches of 2 frames (the last frame repeated) x 16 tokens "
                             "(14+2 per temporal patch) = 64 visual tokens", marks=QWEN3),
])
def test_the_plan_line_adds_up_for_every_family(family, head, tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    plan = plan_budget(vlm, clip, QUESTION, tokens_per_frame=16, max_new_tokens=3, num_frames=7)
    assert _head(plan.summary()) == head
    video = compress_video(vlm, plan.video, compression=plan.compression)
    chat = Chat(vlm, video)
    assert chat.visual.shape[0] == plan.visual_tokens  # the placeholders the line counts, visual and newline


@pytest.mark.parametrize("family", QWEN)
def test_a_qwen_plan_of_small_frames_says_every_token_is_kept(family, tiny_model_dir, small_clip):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    plan = plan_budget(vlm, small_clip, QUESTION, max_new_tokens=3, num_frames=8)  # 54+10 asked, 20 there
    assert _head(plan.summary()) == ("8 frames = 4 temporal patches of 2 frames x 20 tokens (every token: a temporal "
                                     "patch of this size has only 20, fewer than the 54+10 asked) = 80 visual tokens")
    video = compress_video(vlm, plan.video, compression=plan.compression)
    assert video.summary().endswith("x 20 tokens = 80 visual tokens (visionzip: every token, as a temporal patch of "
                                    "this size has only 20, fewer than the 54+10 asked)")


def test_a_fitted_qwen_plan_counts_frames_and_patches_apart(tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir("qwen2_5_vl"), device="cpu")
    plan = plan_budget(vlm, clip, QUESTION, budget=300, tokens_per_frame=16, max_new_tokens=3, num_frames=60)
    assert plan.frames == 34  # 17 temporal patches of 16 tokens: 272 visual tokens + 22 of text + 3 <= 300
    assert plan.summary().startswith("34 frames = 17 temporal patches of 2 frames x 16 tokens (14+2 per temporal "
                                     "patch) = 272 visual tokens; prompt 294 + answer 3 = 297 of 300 tokens")
    assert ("fit: the asked 60 frames = 30 temporal patches of 2 frames x 16 tokens make a prompt of 502 tokens; "
            "with 3 for the answer that is 505 > 300, so 34 of the 60 asked frames are kept") in plan.summary()


# ---- the compressed video's summary

@pytest.mark.parametrize("family, count, text", [
    ("llava", 7, "7 frames{src} x 16 tokens = 112 visual tokens (visionzip: 14 dominant + 2 contextual per image)"),
    ("llava", 1, "1 frame{src} x 16 tokens = 16 visual tokens (visionzip: 14 dominant + 2 contextual per image)"),
    ("llava_next", 3, "3 frames{src} x 80 tokens (5 images x 16) = 240 visual tokens (visionzip: 14 dominant + "
                      "2 contextual per image)"),
    ("qwen2_5_vl", 7, "7 frames{src} = 4 temporal patches of 2 frames (the last frame repeated) x 16 tokens = 64 "
                      "visual tokens (visionzip: 14 dominant + 2 contextual per temporal patch)"),
    ("qwen2_5_vl", 8, "8 frames{src} = 4 temporal patches of 2 frames x 16 tokens = 64 visual tokens (visionzip: "
                      "14 dominant + 2 contextual per temporal patch)"),
    pytest.param("qwen3_vl", 1, "1 frame{src} = 1 temporal patch of 2 frames (the last frame repeated) x 16 tokens = "
                                "16 visual tokens (visionzip: 14 dominant + 2 contextual per temporal patch)",
                 marks=QWEN3),
])
def test_the_summary_adds_up(family, count, text, tiny_model_dir, clip, tmp_path):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    video = compress_video(vlm, clip, num_frames=count, dominant=14, contextual=2)
    assert video.summary() == text.format(src=f" of {clip}")
    again = load_tokens(save_tokens(video, tmp_path / "t"), model=vlm)  # a tokens file says the same
    assert again.summary() == video.summary() and again.sampled_frames == count


def test_thinning_a_qwen_video_counts_its_frames_again(tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir("qwen2_5_vl"), device="cpu")
    video = compress_video(vlm, clip, num_frames=7, dominant=6, contextual=2)  # patches 0..3, the last repeats
    assert (video.num_frames, video.sampled_frames, video.meta["repeated_frames"]) == (4, 7, 1)
    assert video.select([0, 1]).sampled_frames == 4  # the patch holding the repeat left out
    assert video.select([0, 3]).sampled_frames == 3
    assert video.select([1, 2]).frames_text() == "4 frames = 2 temporal patches of 2 frames"


@pytest.mark.parametrize("family", QWEN)
def test_chunks_of_odd_sizes_never_repeat_a_frame_inside_the_video(family, tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    encoder = vlm.video_encoder()
    frames = sample_video(clip, num_frames=9)
    whole = compress_frames(encoder, [frames], dominant=6, contextual=2, batch_size=8)
    chunks = [(frames.frames[i: i + 3], frames.timestamps[i: i + 3], frames.indices[i: i + 3]) for i in (0, 3, 6)]
    parts = compress_frames(encoder, chunks, dominant=6, contextual=2, batch_size=2)
    assert parts.num_frames == whole.num_frames == 5 and parts.sampled_frames == 9  # not 3 patches a chunk
    assert parts.timestamps == pytest.approx(whole.timestamps)
    torch.testing.assert_close(parts.tokens, whole.tokens, rtol=1e-4, atol=1e-4)


# ---- notes when a chat or the temporal stage thins a video

@pytest.mark.parametrize("family, context, kept, frames", [("qwen2_5_vl", 45, 3, 5),
                                                            pytest.param("qwen3_vl", 45, 2, 3, marks=QWEN3)])
def test_fitting_a_qwen_chat_says_patches_and_frames(family, context, kept, frames, tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    video = compress_video(vlm, clip, num_frames=15, dominant=6, contextual=2)  # 8 patches, the last repeats
    chat = Chat(vlm, video, context=context)
    chat.ask("What ?", GenerationConfig(max_new_tokens=2))
    assert (chat.video.num_frames, chat.video.sampled_frames) == (kept, frames)
    assert chat.note.startswith("fitted to the context: 15 frames = 8 temporal patches of 2 frames (the last frame "
                                "repeated) x 8 tokens make a prompt of ")
    assert f"; kept {kept} of 8 temporal patches ({frames} of 15 frames), evenly spread: " in chat.note
    with pytest.raises(VisionZipError, match=rf"use at most {2 * kept} frames \({kept} temporal patches\)"):
        Chat(vlm, video, context=context, policy="strict").ask("What ?", GenerationConfig(max_new_tokens=2))


def test_fitting_a_llava_chat_says_frames(tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clip, num_frames=15, dominant=6, contextual=2)
    chat = Chat(vlm, video, context=90)
    chat.ask("What ?", GenerationConfig(max_new_tokens=2))
    assert chat.note.startswith("fitted to the context: 15 frames x 8 tokens make a prompt of 231 tokens, plus 2 for "
                                "the answer = 233 > the context of 90; kept 5 of 15 frames, evenly spread: prompt 81")


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_the_temporal_stage_says_what_it_thinned(family, tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir(family), device="cpu")
    video = compress_video(vlm, clip, num_frames=15, dominant=6, contextual=2)
    thinned = fit(video, Temporal(threshold=0.99, floor=0.99), 20, width=vlm.video_encoder().width)
    kept = thinned.num_frames  # how many fit depends on the random tiny weights (they differ across transformers)
    assert 1 < kept < video.num_frames and thinned.total_tokens <= 20
    if family == "llava":
        said = f"{kept} of 15 frames kept to fit 20 tokens"
    else:  # evenly spread keeps the last temporal patch, which holds the repeated 15th frame: 2 frames a patch, less 1
        assert thinned.sampled_frames == 2 * kept - 1
        said = f"{kept} of 8 temporal patches ({2 * kept - 1} of 15 frames) kept to fit 20 tokens"
    assert thinned.meta["temporal_thinned"] == said
    assert thinned.summary().endswith(f"; {said})")
    unit = "temporal patches" if family.startswith("qwen") else "frames"
    assert f"repeats of earlier {unit} dropped = {thinned.total_tokens} visual tokens" in thinned.summary()


def test_qwen_tokens_in_a_llava_model_name_the_grid_in_words(tiny_model_dir, clip):
    qwen = load_vlm(tiny_model_dir("qwen2_5_vl"), device="cpu")
    video = compress_video(qwen, clip, num_frames=2, dominant=6, contextual=2)
    llava = load_vlm(tiny_model_dir("llava"), device="cpu")
    with pytest.raises(VisionZipError, match=r"patch grid per video \(dynamic resolution\) vs 8x8;") as info:
        llava.check_tokens(video)
    assert "0x0" not in str(info.value)


# ---- one, not "1 ...s"

def test_single_counts_are_singular(tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir("llava"), device="cpu")
    video = compress_video(vlm, clip, num_frames=3, dominant=6, contextual=2)
    video.timestamps = video.timestamps[:1]
    with pytest.raises(VisionZipError, match=r"^1 timestamps for 3 frames$"):  # the field's name, as given
        video.validate()
    from comfy_visionzip.video.plan import plan_frames

    with pytest.raises(VisionZipError, match=r"^1 timestamp given for 2 frames$"):
        plan_frames(2, 30.0, num_frames=2, timestamps=[0.0])
    from comfy_visionzip.budget import frames_for_budget

    with pytest.raises(VisionZipError, match=r"^a budget of 1 token \(0 reserved\) cannot hold one frame of 2 tokens"):
        frames_for_budget(1, 2)


def test_a_tokens_file_with_nonsense_frame_counts_is_refused(tiny_model_dir, clip, tmp_path):
    vlm = load_vlm(tiny_model_dir("qwen2_5_vl"), device="cpu")
    video = compress_video(vlm, clip, num_frames=4, dominant=6, contextual=2)
    for key, value, said in (("repeated_frames", 2, "repeated_frames must be a whole number 0..1"),
                             ("frames_per_unit", "two", "frames_per_unit must be a whole number of frames 1..16")):
        video.meta[key] = value
        path = save_tokens(video, tmp_path / key)
        with pytest.raises(VisionZipError, match=said):
            load_tokens(path)
        video.meta.pop(key)
        video.meta["frames_per_unit"] = 2


# ---- the command line

def test_ask_says_frames_patches_and_newlines(tiny_model_dir, clip, capsys):
    from comfy_visionzip.__main__ import main

    assert main(["ask", clip, QUESTION, "--model", tiny_model_dir("qwen2_5_vl"), "--frames", "7",
                 "--tokens-per-frame", "16", "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert ("plan: 7 frames = 4 temporal patches of 2 frames (the last frame repeated) x 16 tokens (14+2 per "
            "temporal patch) = 64 visual tokens; prompt 86 + answer 1 = 87 of 4096 tokens (the context)") in out
    assert f"7 frames of {clip} = 4 temporal patches of 2 frames (the last frame repeated) x 16 tokens" in out
    assert "visual tokens in the prompt: 64\n" in out and "(1 token generated;" in out
    assert main(["ask", clip, QUESTION, "--model", tiny_model_dir("llava_onevision"), "--frames", "3",
                 "--tokens-per-frame", "16", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens in the prompt: 48 + 1 newline = 49 placeholders" in out and "(2 tokens generated;" in out


def test_the_command_line_runs_by_the_pack_folder_from_anywhere(tmp_path):
    # what a ComfyUI user types in ComfyUI's folder (no pack on sys.path; -I: isolated like the portable build's
    # Python, which never puts the current folder on sys.path)
    run = subprocess.run([sys.executable, "-I", str(REPO), "fetch-weights", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: python {os.path.relpath(REPO, tmp_path)} fetch-weights")


# ---- attention kernels: refused before anything loads

def test_an_unusable_attention_is_one_line_before_the_weights_load(tiny_model_dir, monkeypatch):
    folder = tiny_model_dir("llava")

    def never(*_args, **_kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(vlm_module, "_from_pretrained", never)
    monkeypatch.setattr(vlm_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else __import__("importlib").util.find_spec(name))
    with pytest.raises(VisionZipError) as info:
        load_vlm(folder, device="cpu", attn_implementation="flash_attention_2")
    assert str(info.value) == ("attention flash_attention_2 needs the flash-attn package, which is not installed: "
                               "pick attention sdpa (about as fast), or install flash-attn "
                               "(pip install flash-attn --no-build-isolation, CUDA GPUs only)")
    with pytest.raises(VisionZipError, match=r"^unknown attention 'flash_attention_3'; valid: sdpa, eager, "
                                             r"flash_attention_2 \(sdpa is fast everywhere\)$"):
        load_tower(folder, device="cpu", attn_implementation="flash_attention_3")


def test_flash_attention_needs_its_package_a_cuda_gpu_and_half_precision(monkeypatch):
    installed = object()
    monkeypatch.setattr(vlm_module.importlib.util, "find_spec", lambda name, *a: installed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VisionZipError, match=r"^attention flash_attention_2 runs only on a CUDA GPU, and this torch "
                                             r"sees none: pick attention sdpa$"):
        check_attention("flash_attention_2", torch.float16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(VisionZipError, match=r"^attention flash_attention_2 runs in fp16 or bf16, not float32: "
                                             r"pick dtype fp16 or bf16, or attention sdpa$"):
        check_attention("flash_attention_2", torch.float32)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    with pytest.raises(VisionZipError, match=rf"is installed, but transformers {transformers.__version__} cannot "
                                             r"use it \(too old, or built for another torch or CUDA\): pick "
                                             r"attention sdpa"):
        check_attention("flash_attention_2", torch.bfloat16)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert check_attention("flash_attention_2", torch.bfloat16) == "flash_attention_2"
    assert check_attention("sdpa", torch.float32) == "sdpa" and check_attention("eager", torch.float32) == "eager"
    with pytest.raises(VisionZipError, match=r"^unknown attention 'None'"):
        check_attention(None, torch.float32)


# ---- where a relative path starts

def test_a_missing_video_says_where_a_relative_path_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VisionZipError, match=r"^nope\.mp4: file not found \(check the path; a relative path starts "
                                             r"from the current folder\)$"):
        open_container("nope.mp4")
    with pytest.raises(VisionZipError, match=r"nope\.mp4: file not found \(check the path\)$"):
        open_container(str(tmp_path / "nope.mp4"))
    os.symlink("loop-b", tmp_path / "loop-a")
    os.symlink("loop-a", tmp_path / "loop-b")
    with pytest.raises(VisionZipError, match=r"^loop-a: a link to no file \(its target is missing, or the links "
                                             r"loop\) \(give the video file itself\)$"):
        open_container("loop-a")


def test_label_tokens_keeps_the_frame_counts(tiny_model_dir, clip):
    vlm = load_vlm(tiny_model_dir("qwen2_5_vl"), device="cpu")
    video = compress_frames(vlm.video_encoder(), [sample_video(clip, num_frames=5)], dominant=6, contextual=2)
    label_tokens(vlm, video)
    assert video.meta["repeated_frames"] == 1 and video.sampled_frames == 5



def test_frames_says_one_frame_and_how_many_the_sheet_shows(clip, clip_factory, tmp_path, capsys):
    from comfy_visionzip.__main__ import main

    assert main(["frames", clip, "--num-frames", "1"]) == 0
    assert f"{Path(clip).name:<28}    1 frame   [" in capsys.readouterr().out
    long = clip_factory("messages-long.mp4", frames=100, size=(64, 48))
    assert main(["frames", long, "--num-frames", "100", "--out", str(tmp_path / "s.png")]) == 0
    assert "(64 of the 100 planned frames, evenly spread)" in capsys.readouterr().out
