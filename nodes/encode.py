"""Encode / compress / preview nodes: thin wrappers over comfy_visionzip.encoder and .zip."""

from __future__ import annotations

import torch

from ..comfy_visionzip.errors import VisionZipError
from ..comfy_visionzip.pipeline import compress_encoded, compress_video, encode_frames, label_tokens
from ..comfy_visionzip.preprocess import model_view
from ..comfy_visionzip.settings import Compression
from ..comfy_visionzip.tokens import kept_count
from ..comfy_visionzip.video import uniform_pick
from ..comfy_visionzip.viz import (
    LEGENDS,
    attention_overlays,
    enlarge,
    mark_patch,
    temporal_notes,
    token_overlays,
    with_legend,
)
from ..comfy_visionzip.zip import METHODS, split_tokens
from . import _comfy
from .model import MODEL_TYPE
from .video import VIDEO_TYPE, cap_note, unplanned, with_notes

FEATURES_TYPE = "VISIONZIP_FEATURES"  # uncompressed select-layer outputs of a few frames
TOKENS_TYPE = "VISIONZIP_TOKENS"  # CompressedVideo: what the answerer consumes

COUNTS = {
    "method": (list(METHODS), {"default": "visionzip",
                               "tooltip": ("visionzip: dominant + contextual tokens (the paper). full: no compression. "
                                           "pool: average pooling. uniform: evenly spaced patches. Baselines use "
                                           "dominant + contextual as their token count.")}),
    "dominant": ("INT", {"default": 54, "min": 1, "max": 4096,
                         "tooltip": ("Dominant tokens per image (the CLS token counts as one): the patches the encoder "
                                     "attends to most.")}),
    "contextual": ("INT", {"default": 10, "min": 0, "max": 4096,
                           "tooltip": ("Contextual tokens per image: the other patches merged by key similarity. 0 = "
                                       "dominant only.")}),
    "tokens_per_frame": ("INT", {"default": 0, "min": 0, "max": 4096,
                                 "tooltip": ("If > 0, overrides dominant/contextual with the paper's ratio (64 -> "
                                             "54+10, 17 -> 14+3). Per image: LLaVA-NeXT frames have several crops.")}),
}


def _counts(dominant: int, contextual: int, tokens_per_frame: int) -> tuple[int, int]:
    return split_tokens(tokens_per_frame) if tokens_per_frame else (dominant, contextual)


def _parse_times(text: str) -> list[float]:
    if not text or not text.strip():
        return []
    try:
        return [float(t) for t in text.replace(";", ",").split(",") if t.strip()]
    except ValueError as e:
        raise VisionZipError("timestamps must be numbers separated by commas (like Load Video's output), "
                             f"got {text[:80]!r}") from e


class VisionZipEncodeFrames:
    DESCRIPTION = ("Runs the vision encoder on frames (an IMAGE batch or a video handle) to the select layer, "
                   "reading the attention scores and keys VisionZip needs. Keeps uncompressed features: for a "
                   "handful of frames (previews, comparing methods). For long videos use Video to Tokens.")
    CATEGORY = "VisionZip/encode"
    FUNCTION = "encode"
    RETURN_TYPES = (FEATURES_TYPE,)
    RETURN_NAMES = ("features",)
    OUTPUT_TOOLTIPS = ("Select-layer features, scores and keys of every frame (uncompressed).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load VLM."}),
                "batch_size": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "Frames per encoder batch."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Frames as an IMAGE batch (all the same size)."}),
                "video": (VIDEO_TYPE, {"tooltip": ("A video handle from Load Video (VisionZip): every planned frame is "
                                                   "encoded.")}),
                "timestamps": ("STRING", {"forceInput": True,
                                          "tooltip": "Seconds of each IMAGE frame (Load Video's timestamps output)."}),
            },
        }

    def encode(self, model, batch_size, images=None, video=None, timestamps=""):
        if (images is None) == (video is None):
            raise ValueError("connect exactly one of 'images' or 'video'")
        capped = ""
        with model as vlm:
            encoder = vlm.video_encoder()
            if video is not None:
                video, plan = unplanned(video)
                total = len(video.plan()[0])
                capped = cap_note(video) if plan is None else ""  # Frame Budget said what it was given
                chunks = video.iter(chunk_size=batch_size)
            else:
                times = _parse_times(timestamps)
                if times and len(times) != images.shape[0]:
                    raise ValueError(f"{len(times)} timestamps for {images.shape[0]} frames")
                total = images.shape[0]
                chunks = [(images, times, list(range(total)))]
            features = encode_frames(encoder, chunks, batch_size=batch_size, progress=_comfy.progress_callback(total),
                                     total=total)
            label_tokens(vlm, features)
        held = Features(features, model)
        if capped:  # nothing caps silently: the node shows it (it has no text output)
            return {"ui": {"text": [f"{total} frames encoded; {capped}"]}, "result": (held,)}
        return (held,)


class Features:
    """Encode Frames' output: the encoded frames and the handle of the model that made them. It holds no model (the
    encoder is asked of the handle when compressing), so ComfyUI's cache of it never keeps the model in memory."""

    def __init__(self, encoded, handle) -> None:
        encoded.encoder = None
        self.encoded = encoded
        self.handle = handle

    @property
    def views(self):
        return self.encoded.views


class VisionZipCompress:
    DESCRIPTION = "Compresses encoded frames to dominant + contextual tokens per image (or a baseline method)."
    CATEGORY = "VisionZip/encode"
    FUNCTION = "compress"
    RETURN_TYPES = (TOKENS_TYPE, "STRING")
    RETURN_NAMES = ("tokens", "summary")
    OUTPUT_TOOLTIPS = ("Compressed visual tokens, for Answer / Save Tokens / Attention Heatmap.", "What was kept.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"features": (FEATURES_TYPE, {"tooltip": "From Encode Frames."}), **COUNTS}}

    def compress(self, features, method, dominant, contextual, tokens_per_frame):
        dominant, contextual = _counts(dominant, contextual, tokens_per_frame)
        with features.handle as vlm:
            video = compress_encoded(vlm.video_encoder(), features.encoded, dominant=dominant, contextual=contextual,
                                     method=method)
        video.meta.update(features.encoded.meta)
        summary = video.summary(file_name_only=True)
        return {"ui": {"text": [summary]}, "result": (video, summary)}


class VisionZipVideoToTokens:
    DESCRIPTION = ("Long video straight to compressed tokens: samples, encodes and compresses chunk by chunk, so "
                   "only the compressed tokens are ever kept (thousands of frames in little memory).")
    CATEGORY = "VisionZip/encode"
    FUNCTION = "run"
    RETURN_TYPES = (TOKENS_TYPE, "STRING")
    RETURN_NAMES = ("tokens", "summary")
    OUTPUT_TOOLTIPS = ("Compressed visual tokens of every planned frame.", "Frames and tokens used.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load VLM."}),
                "video": (VIDEO_TYPE, {"tooltip": "From Load Video (VisionZip): the file and its frame plan."}),
                **COUNTS,
                "batch_size": ("INT", {"default": 8, "min": 0, "max": 256,
                                       "tooltip": ("Frames encoded at a time (the next ones decode meanwhile). 0 = "
                                                   "sized to the GPU's free memory; halved automatically on "
                                                   "out-of-memory.")}),
            },
            "optional": {
                "temporal": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": ("Across frames: drop tokens that repeat a token kept in an earlier "
                                                   "frame (cosine similarity at least this, at the same or a "
                                                   "neighbouring place); static stretches then cost far fewer tokens. "
                                                   "0.95 is the default (bench/bench_temporal.py: static video costs "
                                                   "about 3% of the tokens, real handheld motion 85%); 0 = off, unless "
                                                   "Frame Budget planned the video with it (then its budget and its "
                                                   "threshold are used).")}),
            },
        }

    def run(self, model, video, method, dominant, contextual, tokens_per_frame, batch_size, temporal=0.0):
        if video is None:
            raise ValueError("no video: Frame Budget's video output is empty when its own video input is not "
                             "connected; connect Load Video (VisionZip) to Frame Budget's video input, or here "
                             "directly")
        handle, plan = unplanned(video)
        planned = plan.temporal if plan is not None else None  # Frame Budget planned with the temporal stage
        # this node's own threshold, else the one Frame Budget planned with; the plan's room holds the stage
        compression = Compression.parse(method=method, dominant=dominant, contextual=contextual,
                                        tokens_per_frame=tokens_per_frame, temporal=temporal or planned)
        if planned is not None:
            compression = compression.with_temporal_budget(planned.budget)
        total = len(handle.plan()[0])
        with model as vlm:
            tokens = compress_video(vlm, handle, compression=compression, batch_size=batch_size or None,
                                    progress=_comfy.progress_callback(total))
        # (Frame Budget already said it when it planned)
        summary = with_notes(tokens.summary(file_name_only=True), cap_note(handle) if plan is None else "")
        return {"ui": {"text": [summary]}, "result": (tokens, summary)}


class VisionZipAttentionHeatmap:
    DESCRIPTION = ("Shows what VisionZip sees: the attention each patch gets at the select layer, and which patches "
                   "were kept as dominant tokens (full colour) and which were merged into which contextual token "
                   "(one tint per token).")
    CATEGORY = "VisionZip/preview"
    FUNCTION = "draw"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("attention", "kept_tokens")
    OUTPUT_TOOLTIPS = ("Attention heatmap over what the model saw of each frame.",
                       "Kept (dominant) patches in colour; merged patches tinted by the contextual token they joined.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "tokens": (TOKENS_TYPE, {"tooltip": "From VisionZip Compress or Video to Tokens."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": ("The frames to draw on (e.g. Load Video's preview). If the tokens "
                                                 "hold more frames, the overlays use evenly spaced ones, which is how "
                                                 "Load Video picks its preview.")}),
                "features": (FEATURES_TYPE, {"tooltip": ("From Encode Frames: its stored views are used when no images "
                                                         "are given.")}),
            },
        }

    def draw(self, tokens, images=None, features=None):
        if tokens.scores is None or tokens.assignment is None:
            raise ValueError("these tokens carry no attention maps (made with keep_maps off, or loaded from a file)")
        crops = max(tokens.crops, 1)
        if images is not None:
            picks = uniform_pick(tokens.num_frames, images.shape[0])
            views = model_view(images[: len(picks)], tokens.preprocess)
        elif features is not None and features.views is not None:
            picks = list(range(min(tokens.num_frames, features.views.shape[0])))
            views = features.views[: len(picks)]
        else:
            raise ValueError("connect 'images' (or 'features' from Encode Frames) to draw on")
        rows = torch.tensor([p * crops for p in picks])  # the whole-frame image of each picked frame
        views = torch.from_numpy(enlarge(views))  # small models see 48 px: shown large, patch borders sharp
        heat = attention_overlays(views, tokens.scores[rows], tokens.grid, cls_token=tokens.cls_token)
        repeated, notes = temporal_notes(tokens, picks)
        kept = token_overlays(views, tokens.assignment[rows], tokens.grid, cls_token=tokens.cls_token,
                              kept=kept_count(tokens), repeated=repeated, notes=notes)
        kind = "tokens" if repeated is None else "temporal"
        # the legends are drawn under each picture, and said on the node too: a preview of many pictures shows
        # each one too small to read its band
        legend = f"attention: {LEGENDS['attention']}\nkept_tokens: {LEGENDS[kind]}"
        return {"ui": {"text": [legend]},
                "result": (_image(with_legend(heat, "attention")), _image(with_legend(kept, kind)))}


def _image(pictures) -> torch.Tensor:
    return torch.from_numpy(pictures).float() / 255  # a ComfyUI IMAGE: float 0..1 [T, H, W, 3]


class VisionZipPatchAttention:
    DESCRIPTION = ("The redundancy explorer: the select layer's attention FROM one patch (x, y) to every patch, over "
                   "each frame. In the paper (Fig. 15) a subject's patch attends mostly to a few dominant tokens "
                   "elsewhere, not to its neighbours: those few tokens already carry the image.")
    CATEGORY = "VisionZip/preview"
    FUNCTION = "draw"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("attention", "summary")
    OUTPUT_TOOLTIPS = ("Attention from the marked patch (white square) over what the model saw of each frame.",
                       "Where that patch looks: the share of its attention that goes to its 10 most attended patches.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load VLM."}),
                "images": ("IMAGE", {"tooltip": ("Frames (e.g. Load Video's preview) or any image batch (all the same "
                                                 "size).")}),
                "x": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                "tooltip": "Across what the model sees of the frame: 0 = left edge, 1 = right edge."}),
                "y": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                "tooltip": "Down what the model sees of the frame: 0 = top, 1 = bottom."}),
            }
        }

    def draw(self, model, images, x, y):
        with model as vlm:
            encoder = vlm.video_encoder()
            attention, patch = encoder.attention_from(images, (x, y))
            views = torch.from_numpy(enlarge(encoder.view(images)))
            grid = encoder.patch_grid(images)
        heat = attention_overlays(views, attention, grid, cls_token=False)
        heat = mark_patch(heat, patch, grid)
        top = attention.topk(min(10, attention.shape[1]), dim=1).values.sum(1)
        rows, cols = grid
        summary = (f"patch ({patch % cols}, {patch // cols}) of a {cols}x{rows} grid: its 10 most attended patches get "
                   + ", ".join(f"{share * 100:.0f}%" for share in top.tolist()) + " of its attention (frame by frame)")
        return {"ui": {"text": [f"{summary}\n{LEGENDS['patch']}"]},
                "result": (_image(with_legend(heat, "patch")), summary)}


NODE_CLASS_MAPPINGS = {
    "VisionZipEncodeFrames": VisionZipEncodeFrames,
    "VisionZipCompress": VisionZipCompress,
    "VisionZipVideoToTokens": VisionZipVideoToTokens,
    "VisionZipAttentionHeatmap": VisionZipAttentionHeatmap,
    "VisionZipPatchAttention": VisionZipPatchAttention,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VisionZipEncodeFrames": "Encode Frames (VisionZip)",
    "VisionZipCompress": "VisionZip Compress",
    "VisionZipVideoToTokens": "Video to Tokens (VisionZip)",
    "VisionZipAttentionHeatmap": "Attention Heatmap (VisionZip)",
    "VisionZipPatchAttention": "Patch Attention (VisionZip)",
}
