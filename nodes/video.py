"""Video nodes: Load Video (sampling) and Frame Budget. Thin: every run method calls the library."""

from __future__ import annotations

import dataclasses
import os

from ..comfy_visionzip import VideoHandle, frames_for_budget, plan_budget, sample_video
from ..comfy_visionzip.budget import POLICIES, BudgetPlan, cap_budget, context_length
from ..comfy_visionzip.video import BACKENDS, SEEKS, FramesHandle, uniform_pick
from . import _comfy

CATEGORY = "VisionZip/video"
VIDEO_TYPE = "VISIONZIP_VIDEO"  # a VideoHandle (the file + sampling plan, streamed later), or Frame Budget's BudgetPlan


def unplanned(video):
    """(the handle to stream, the BudgetPlan it came with or None) of what a VISIONZIP_VIDEO input carries."""
    if isinstance(video, BudgetPlan):  # Frame Budget's output: the thinned handle and the settings it planned
        return video.video, video
    return video, None


def cap_note(handle) -> str:
    """What Load Video's max_frames cut from the plan of ``handle`` ("capped at 256 of 600 planned frames by Load
    Video's max_frames"), or "" when it cut nothing: the node that takes a handle straight from Load Video (Frame
    Budget, Video to Tokens, Encode Frames) says so; nothing caps silently."""
    if handle.max_frames is None or handle.picks is not None:
        return ""
    kept = len(handle.plan()[0])
    planned = len(dataclasses.replace(handle, max_frames=None).plan()[0])
    return f"capped at {kept} of {planned} planned frames by Load Video's max_frames" if planned > kept else ""


def with_notes(summary: str, *notes: str) -> str:
    """``summary`` with the non-empty ``notes`` after it ("; "-separated, the summary's numbers stay first)."""
    return "; ".join([summary, *(note for note in notes if note)])


MODES = ["num_frames", "fps", "every", "interval"]


def _served(source: str) -> bool:
    """Whether a 'video' list entry, resolved, lies in ComfyUI's input or output folder: the list may not name other
    files (the 'path' input is for the user's own files). Without ComfyUI every path is the user's own."""
    root = _comfy.input_directory()
    return root is None or any(_comfy.within(source, r) for r in (root, _comfy.output_directory()))


def _not_listed(video: str) -> str:
    return (f"video {video[:200]!r} is not in ComfyUI's input folder: upload one with 'choose file to upload', "
            "pick another, or pick the empty entry and type a path / connect a VIDEO")


def _not_found(path: str, source: str) -> str:
    """A typed path that names no file; in ComfyUI a relative one was looked for in its input folder."""
    start = "ComfyUI's input folder" if _comfy.input_directory() is not None else "the current folder"
    absolute = os.path.isabs(os.path.expanduser(path.strip().strip('"')))
    relative = "" if absolute else f" (relative paths start from {start})"
    return f"{source[:300]}: file not found{relative}; check the path in Load Video's 'path'"


def _format_timestamps(seconds: list[float]) -> str:
    return ", ".join(f"{t:.3f}" for t in seconds)


class VisionZipLoadVideo:
    """Sample frames from a long video without decoding it all: a plan + a small preview."""

    DESCRIPTION = ("Samples frames from a video file (frame-accurate, any container FFmpeg reads). Outputs a "
                   "handle the VisionZip encoder streams from (no giant IMAGE batch), plus a preview IMAGE.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE", "STRING", VIDEO_TYPE, "INT")
    RETURN_NAMES = ("frames", "timestamps", "video", "frame_count")
    OUTPUT_TOOLTIPS = (
        "Up to preview_frames of the sampled frames (spread uniformly), RGB 0..1, display orientation.",
        "Timestamps in seconds of the frames in the IMAGE output, comma separated.",
        "The video and its sampling plan; connect to VisionZip Encode / Video to Tokens to stream every planned frame.",
        "How many frames the plan samples in total.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                # the empty entry first: it is the default, and ComfyUI's upload widget only keeps an empty saved
                # value when it is the default (otherwise a loaded workflow gets the first file of input/)
                "video": (["", *_comfy.list_input_videos()], {
                    "video_upload": True,
                    "tooltip": ("A video in ComfyUI's input folder (upload with the button). The empty entry (first): "
                                "none picked, use 'path' or a VIDEO input. Ignored when 'path' or a VIDEO input is "
                                "given.")}),
                "mode": (MODES, {"default": "num_frames",
                                 "tooltip": ("num_frames: N frames spread over [start, end); fps: frames per second of "
                                             "video; every: every n-th frame; interval: one frame every 'interval' "
                                             "seconds (60 = one a minute).")}),
                "num_frames": ("INT", {"default": 16, "min": 1, "max": 100000,
                                       "tooltip": "mode num_frames: how many frames, first and last included."}),
                "fps": ("FLOAT", {"default": 1.0, "min": 0.0001, "max": 240.0, "step": 0.0001, "round": 0.0001,
                                  "tooltip": ("mode fps: frames per second of video to take (1.0 = one frame a "
                                              "second). For one frame a minute or rarer, use mode interval.")}),
                "every": ("INT", {"default": 30, "min": 1, "max": 100000,
                                  "tooltip": "mode every: take every n-th frame."}),
                "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e7, "step": 0.1,
                                    "tooltip": "Seconds: ignore frames before this time."}),
                "end": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e7, "step": 0.1,
                                  "tooltip": "Seconds: ignore frames from this time on. 0 = to the end."}),
                "max_frames": ("INT", {"default": 0, "min": 0, "max": 100000,
                                       "tooltip": ("Cap on the number of frames; a longer plan is thinned evenly over "
                                                   "the range (Frame Budget and Video to Tokens say so when it "
                                                   "does). 0 = no cap: let Frame Budget fit the plan to the model.")}),
                "max_size": ("INT", {"default": 768, "min": 0, "max": 8192,
                                     "tooltip": ("Scale frames so the longer side is at most this many pixels (the "
                                                 "encoder resizes anyway). 0 = original size.")}),
                "preview_frames": ("INT", {"default": 16, "min": 0, "max": 100000,
                                           "tooltip": ("How many of the sampled frames go to the IMAGE output. 0 = all "
                                                       "(beware: long videos make huge batches).")}),
                "backend": (["auto", *BACKENDS], {"default": "auto",
                                                  "tooltip": ("Decoder: auto (= pyav, safe for every file), pyav, "
                                                              "decord (optional), opencv (optional).")}),
            },
            "optional": {
                "path": ("STRING", {"default": "", "tooltip": ("A video file of your own anywhere on this computer "
                                                               "(the node reads your files there): an absolute path, "
                                                               "or one relative to ComfyUI's input folder. Overrides "
                                                               "the dropdown.")}),
                "video_input": ("VIDEO", {"tooltip": ("A core ComfyUI VIDEO (e.g. from Load Video); overrides file and "
                                                      "path.")}),
                "interval": ("FLOAT", {"default": 60.0, "min": 0.001, "max": 1e6, "step": 0.5,
                                       "tooltip": ("mode interval: seconds between frames (60 = one frame a minute; "
                                                   "0.5 = two a second).")}),
                "seek": (list(SEEKS), {"default": "exact",
                                       "tooltip": ("exact: every planned frame decoded exactly. keyframe: a keyframe "
                                                   "within half the sampling interval serves a planned frame (far "
                                                   "faster for a few frames of a long video; each frame keeps its "
                                                   "own true time, and Frame Budget says how many moved).")}),
                "decode_workers": ("INT", {"default": 0, "min": 0, "max": 64,
                                           "tooltip": ("Decode processes for long plans: 0 = chosen from the plan and "
                                                       "the CPU cores; 1 = decode inside ComfyUI's process.")}),
            },
        }

    @staticmethod
    def _source(video: str, path: str = "", video_input=None):
        """A path / file object to stream from, or the core VIDEO's frames when it has no stream."""
        if video_input is not None:
            try:
                return video_input.get_stream_source()
            except Exception:  # noqa: BLE001 - a VIDEO built from images has no stream (ComfyUI raises ValueError)
                components = video_input.get_components()
                return components
        if path or not video:
            source = _comfy.resolve_input_path(path)
            if source and not os.path.lexists(source):
                raise ValueError(_not_found(path, source))
            return source
        source = _comfy.resolve_input_path(video)
        if not _served(source):
            raise ValueError(_not_listed(video))
        return source

    @classmethod
    def IS_CHANGED(cls, video, path="", video_input=None, **_kwargs):  # (IS_CHANGED: **kwargs skips no check)
        if video_input is not None:
            return float("nan")
        source = _comfy.resolve_input_path(path or video)
        try:
            return f"{source}:{os.path.getmtime(source)}"
        except OSError:
            return source

    @classmethod
    def VALIDATE_INPUTS(cls, video):
        # Only `video` is named here: ComfyUI then checks every other input itself (types, min/max, choices),
        # and reports a problem once. `path` and `video_input` override the choice and are checked when run.
        if not video:
            return True
        source = _comfy.resolve_input_path(video)
        # ComfyUI leaves the list check of `video` to us: the same answer for a name outside the folders, whatever is
        # there, and for a missing file
        if not _served(source) or not os.path.isfile(source):
            return _not_listed(video)
        return True

    def load(self, video, mode, num_frames, fps, every, start, end, max_frames, max_size, preview_frames, backend,
             path="", video_input=None, interval=60.0, seek="exact", decode_workers=0):
        source = self._source(video, path, video_input)
        if isinstance(source, str) and not source:
            raise ValueError("no video given: upload or pick a file in Load Video's 'video' list, type a path, "
                             "or connect a VIDEO input")
        rate = fps if mode == "fps" else 1.0 / float(interval) if mode == "interval" else None
        plan = dict(num_frames=num_frames if mode == "num_frames" else None, fps=rate,
                    every=every if mode == "every" else None, start=float(start),
                    end=float(end) if end and end > 0 else None, max_frames=max_frames or None)
        if hasattr(source, "images"):  # core VIDEO components: frames already decoded
            handle = FramesHandle(source.images, float(source.frame_rate), **plan)
            indices, times = handle.plan()
            keep = indices if not preview_frames else [indices[i] for i in uniform_pick(len(indices), preview_frames)]
            preview = handle.frames[keep].float() / 255
            return (preview, _format_timestamps([times[indices.index(k)] for k in keep]), handle, len(indices))
        handle = VideoHandle(source, backend=backend, max_size=max_size or None, seek=seek,
                             workers=decode_workers or None, **plan)
        indices, _times = handle.plan()
        keep = indices if not preview_frames else [indices[i] for i in uniform_pick(len(indices), preview_frames)]
        preview = sample_video(source, frames=keep, backend=backend, max_size=handle.max_size,
                               progress=_comfy.progress_callback(len(keep)), workers=handle.workers)
        return (preview.to_image(), _format_timestamps(preview.timestamps), handle, len(indices))


class VisionZipFrameBudget:
    """How many frames fit: exactly, with the model and the video connected; by arithmetic without them."""

    DESCRIPTION = ("Frames that fit in a token budget. With a model and a video connected it counts the whole prompt "
                   "exactly (chat template, timestamps, the question) and reserves room for the answer, then thins the "
                   "video's plan to fit (policy fit) or refuses (strict); its video output goes to Video to Tokens. "
                   "Without them: frames x tokens per frame arithmetic only.")
    CATEGORY = CATEGORY
    FUNCTION = "plan"
    OUTPUT_NODE = True
    RETURN_TYPES = ("INT", "STRING", VIDEO_TYPE)
    RETURN_NAMES = ("frames", "summary", "video")
    OUTPUT_TOOLTIPS = ("Number of frames that fit.", "A one-line explanation of the numbers.",
                       "The connected video with its plan thinned to the frames that fit, and the settings it was "
                       "planned with (connect to Video to Tokens).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "token_budget": ("INT", {"default": 4096, "min": 0, "max": 1 << 22,
                                         "tooltip": ("Tokens the prompt and the answer may use. 0 = the model's "
                                                     "context (needs the model connected).")}),
                "tokens_per_frame": ("INT", {"default": 64, "min": 1, "max": 100000,
                                             "tooltip": ("Tokens each image keeps: dominant + contextual (64 = 54+10 "
                                                         "for LLaVA-1.5, 17 for Video-LLaVA, 576 uncompressed). Set "
                                                         "Video to Tokens to the same.")}),
                "reserved": ("INT", {"default": 0, "min": 0, "max": 1 << 22,
                                     "tooltip": ("Tokens kept free besides: with a model, for follow-up questions (the "
                                                 "prompt and the answer are counted exactly); without one, for the "
                                                 "question and the answer too.")}),
                "max_frames": ("INT", {"default": 0, "min": 0, "max": 100000,
                                       "tooltip": "Never return more than this (0 = no cap)."}),
            },
            "optional": {
                "model": ("VISIONZIP_MODEL", {"tooltip": ("From Load VLM: count the prompt exactly with its template, "
                                                          "tokenizer and context.")}),
                "video": (VIDEO_TYPE, {"tooltip": ("From Load Video (VisionZip): its plan is what is asked; the output "
                                                   "video holds what fits.")}),
                "question": ("STRING", {"default": "What happens in this video?", "multiline": True,
                                        "tooltip": ("The first question (counted exactly; Answer checks again with its "
                                                    "own).")}),
                "max_new_tokens": ("INT", {"default": 256, "min": 1, "max": 8192,
                                           "tooltip": "Room kept for the answer (use Answer's max_new_tokens)."}),
                "policy": (list(POLICIES), {"default": "fit",
                                            "tooltip": ("fit: thin the frames evenly until everything fits. strict: "
                                                        "stop with the numbers instead.")}),
                "temporal": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": ("Plan with the temporal stage (needs a model and a video): static "
                                                   "stretches cost less, so up to 4x the frames are kept and the room "
                                                   "for visual tokens travels with the video to Video to Tokens, which "
                                                   "drops repeats until they fit. The value is its similarity "
                                                   "threshold (0.95 is the default); 0 = off.")}),
            },
        }

    def plan(self, token_budget, tokens_per_frame, reserved=0, max_frames=0, model=None, video=None,
             question="What happens in this video?", max_new_tokens=256, policy="fit", temporal=0.0):
        video, _earlier = unplanned(video)
        if model is None or video is None:
            if token_budget == 0:
                missing = "a video" if model is not None else "a model and a video"
                raise ValueError(f"a token budget of 0 means the model's context: connect {missing}")
            note = "arithmetic only: connect a model and a video to count the prompt"
            if model is not None:  # the context and the answer's room are known; the prompt needs the video
                reserved += max_new_tokens
                note = (f"{max_new_tokens} of the reserve for the answer; arithmetic only: connect a video to count "
                        "the prompt exactly")
                token_budget, capped = cap_budget(token_budget, context_length(model.vlm), policy)
                note = f"{capped}; {note}" if capped else note
            frames = frames_for_budget(token_budget, tokens_per_frame, reserved=reserved, max_frames=max_frames or None)
            summary = (f"{frames} frames x {tokens_per_frame} tokens = {frames * tokens_per_frame} of {token_budget} "
                       f"tokens ({reserved} reserved)")
            thinned, notes = None, []
            if video is not None:
                indices, _times = video.plan()
                notes.append(cap_note(video))
                thinned = video
                if len(indices) > frames:
                    thinned = video.pick([indices[i] for i in uniform_pick(len(indices), frames)])
                    notes.append(f"the video's {len(indices)} planned frames thinned evenly to {frames}")
            summary = with_notes(summary, *notes, note)
            return {"ui": {"text": [summary]}, "result": (frames, summary, thinned)}
        notes = [cap_note(video)]
        if max_frames:
            indices, _times = video.plan()
            if len(indices) > max_frames:
                video = video.pick([indices[i] for i in uniform_pick(len(indices), max_frames)])
                notes.append(f"capped at {max_frames} of {len(indices)} planned frames by max_frames")
        plan = plan_budget(model.vlm, video, question or "?", budget=token_budget, policy=policy,
                           tokens_per_frame=tokens_per_frame, max_new_tokens=max_new_tokens, follow_up_tokens=reserved,
                           temporal=temporal or None)
        summary = with_notes(plan.summary(), *notes)
        return {"ui": {"text": [summary]}, "result": (plan.frames, summary, plan)}


NODE_CLASS_MAPPINGS = {
    "VisionZipLoadVideo": VisionZipLoadVideo,
    "VisionZipFrameBudget": VisionZipFrameBudget,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VisionZipLoadVideo": "Load Video (VisionZip)",
    "VisionZipFrameBudget": "Frame Budget (VisionZip)",
}

