"""The streaming pipeline: sample -> encode -> zip, chunk by chunk, for any encoder.

Long video streams through: the next chunk decodes in a background thread while the current batch
encodes, each batch is compressed at once and its uncompressed features dropped, and only the
compressed tokens accumulate (written into buffers allocated once for the planned frame count). An
out-of-memory error while encoding halves the batch and retries. The temporal stage, when on, runs as
the batches stream. :func:`compress_video` is the whole pipeline for a loaded model and a video.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from . import temporal as temporal_stage
from .encoded import EncodedImages, Encoder
from .errors import VisionZipError
from .models.base import VisionLanguageModel
from .settings import Compression
from .stream import prefetch
from .temporal import Temporal
from .tokens import CompressedVideo
from .video import FramesHandle, VideoClip, VideoHandle
from .zip import token_cells

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Chunk = VideoClip | tuple[torch.Tensor, list[float], list[int]] | torch.Tensor
Batch = tuple[torch.Tensor, list[float], list[int], str]


def _unpack(chunk: Chunk) -> tuple[torch.Tensor, list[float], list[int], str]:
    if isinstance(chunk, VideoClip):
        return chunk.frames, list(chunk.timestamps), list(chunk.indices), chunk.source
    if isinstance(chunk, tuple) and len(chunk) == 3:
        frames, times, indices = chunk
        return frames, list(times), list(indices), ""
    if isinstance(chunk, torch.Tensor):  # bare frames: times unknown
        return chunk, [], list(range(chunk.shape[0])), ""
    raise VisionZipError(f"cannot encode a {type(chunk).__name__}; give VideoClip chunks or frame tensors")


def _batches(chunks: Iterable[Chunk], batch_size: int, unit: int = 1) -> Iterator[Batch]:
    """(frames, timestamps, indices, source) batches of at most ``batch_size`` frames from any chunk stream.

    With ``unit`` frames per encoded image (Qwen: a temporal patch of two), every batch but the last holds
    whole units: a chunk's leftover frames wait for the next chunk, so only the video's own last frame is
    ever repeated to fill a temporal patch (as the model's processor does), never one in the middle.
    """
    held: Batch | None = None  # fewer than `unit` frames from the end of the previous chunk
    for chunk in chunks:
        frames, times, indices, source = _unpack(chunk)
        if held is not None:
            frames = torch.cat([held[0], frames.to(held[0].device)])
            times, indices, source = held[1] + times, held[2] + indices, held[3] or source
            held = None
        whole = frames.shape[0] - frames.shape[0] % unit
        for start in range(0, whole, batch_size):
            stop = min(start + batch_size, whole)
            yield frames[start:stop], times[start:stop], indices[start:stop], source
        if whole < frames.shape[0]:
            held = (frames[whole:], times[whole:], indices[whole:], source)
    if held is not None:
        yield held


def encode_frames(
    encoder: Encoder,
    chunks: Iterable[Chunk],
    *,
    batch_size: int = 8,
    progress: Progress | None = None,
    total: int | None = None,
    keep_views: bool = True,
) -> EncodedImages:
    """Encode every frame and keep the uncompressed select-layer outputs (for a handful of frames:
    previews, side-by-side method comparisons). Long videos go through :func:`compress_frames`."""
    parts, views, times, indices = [], [], [], []
    done = 0
    batch_size = _unit_batch(encoder, batch_size)
    for frames, batch_times, batch_indices, _source in _batches(chunks, batch_size, encoder.frames_per_unit):
        batch_times, batch_indices = encoder.units(batch_times, batch_indices)
        encoded = encoder.encode(frames, batch_size=batch_size * 8)
        parts.append(EncodedImages(encoded.hidden.to("cpu"), encoded.scores.to("cpu"), encoded.keys.to("cpu"),
                                   encoded.cls_token, encoded.grid, encoded.crops, meta=encoded.meta))
        if keep_views:
            views.append(encoder.view(frames))
        times += batch_times
        indices += batch_indices
        done += frames.shape[0]
        if progress is not None:
            progress(done, total or done)
    if not parts:
        raise VisionZipError("no frames to encode")
    merged = EncodedImages.concat(parts)
    merged.timestamps, merged.indices = times, indices
    merged.views = torch.cat(views) if keep_views else None
    merged.encoder = encoder
    merged.meta = _counted_meta(parts[0].meta, encoder, merged.num_frames, done)
    return merged


def compress_encoded(encoder: Encoder, encoded: EncodedImages, *, dominant: int, contextual: int,
                     method: str = "visionzip", keep_maps: bool = True) -> CompressedVideo:
    """Compress encoded frames (all crops of a frame stay together, in order)."""
    result = encoder.zip(encoded, dominant, contextual, method)
    frames = encoded.num_frames
    tokens = result.tokens.reshape(frames, -1, result.tokens.shape[-1])  # (frames, crops * K, D)
    return CompressedVideo(
        tokens=tokens.to("cpu"), timestamps=list(encoded.timestamps), indices=list(encoded.indices), method=method,
        dominant=dominant, contextual=contextual, crops=encoded.crops, grid=encoded.grid, cls_token=encoded.cls_token,
        scores=encoded.scores.to("cpu", torch.float16) if keep_maps else None,
        assignment=result.assignment.to("cpu", torch.int16) if keep_maps else None,
        preprocess=encoder.preprocess_spec, meta=dict(encoded.meta),
        positions=token_cells(result).reshape(frames, -1).to("cpu", torch.int32),
    )


def _unit_batch(encoder: Encoder, size: int) -> int:
    """A batch size that keeps an encoder's temporal patches whole (a multiple of its frames per unit)."""
    unit = encoder.frames_per_unit
    return max(unit, -(-int(size) // unit) * unit)


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()  # MPS, older CUDA builds


def auto_batch_size(encoder: Encoder, *, most: int = 64) -> int:
    """Frames per encoder batch for this device: from free GPU memory on CUDA (half of it, the rest left
    to the allocator and the language model; see :meth:`Encoder.frame_bytes`), 8 elsewhere."""
    device = encoder.device
    if device.type != "cuda":
        return 8
    free, _total = torch.cuda.mem_get_info(device)
    return int(max(1, min(most, free * 0.5 // encoder.frame_bytes())))


def compress_frames(
    encoder: Encoder,
    chunks: Iterable[Chunk],
    *,
    dominant: int = 54,
    contextual: int = 10,
    method: str = "visionzip",
    batch_size: int | None = 8,
    keep_maps: bool = True,
    progress: Progress | None = None,
    total: int | None = None,
    prefetch_depth: int = 1,
    temporal: Temporal | float | int | str | bool | None = None,
    compression: Compression | None = None,
) -> CompressedVideo:
    """Stream frames (VideoClip chunks, (frames, timestamps, indices) tuples or frame tensors) through
    encode + zip, ``batch_size`` frames at a time (None or 0: sized to the device, see
    :func:`auto_batch_size`).

    Each batch is encoded, compressed and dropped: only the compressed tokens (and, with ``keep_maps``,
    small per-token maps for heatmaps) are kept. The next chunk decodes in a background thread while
    the current one encodes (``prefetch_depth`` chunks ahead; 0: no thread). An out-of-memory error
    while encoding (CUDA OOM or a host ``MemoryError``) halves the batch and retries, with a log line.
    ``progress(done_frames, total)`` is called after every batch; raising from it cancels.
    ``temporal`` (a :class:`~comfy_visionzip.temporal.Temporal`, a threshold, a budget or True) drops tokens
    that repeat earlier frames' as the batches stream (see :mod:`comfy_visionzip.temporal`).
    ``compression`` gives method, counts and temporal at once (then leave those arguments out).
    """
    settings = compression or Compression.parse(method=method, dominant=dominant, contextual=contextual,
                                                temporal=temporal)
    return stream(encoder, chunks, settings, batch_size=batch_size, keep_maps=keep_maps, progress=progress,
                  total=total, prefetch_depth=prefetch_depth)


def stream(
    encoder: Encoder,
    chunks: Iterable[Chunk],
    settings: Compression,
    *,
    batch_size: int | None = 8,
    keep_maps: bool = True,
    progress: Progress | None = None,
    total: int | None = None,
    prefetch_depth: int = 1,
) -> CompressedVideo:
    """:func:`compress_frames` with settings already checked (what :func:`compress_video` runs)."""
    temporal = settings.temporal
    matcher = None
    if not batch_size:
        batch_size = auto_batch_size(encoder)
        log.info("encoder batch: %d frames (sized to %s)", batch_size, encoder.device)
    batch_size = _unit_batch(encoder, batch_size)
    limit = int(batch_size)  # frames per forward; halved on out-of-memory
    out = _Accumulator(total)
    done = 0
    source = ""
    for frames, times, indices, chunk_source in _batches(prefetch(chunks, prefetch_depth), batch_size,
                                                         encoder.frames_per_unit):
        source = source or chunk_source
        start = 0
        while start < frames.shape[0]:
            stop = start + limit
            try:
                encoded = encoder.encode(frames[start:stop], batch_size=limit * 8)
                encoded.timestamps, encoded.indices = encoder.units(times[start:stop], indices[start:stop])
                part = compress_encoded(encoder, encoded, dominant=settings.dominant, contextual=settings.contextual,
                                        method=settings.method, keep_maps=keep_maps)
                if temporal is not None:
                    if matcher is None:
                        matcher = temporal_stage.Matcher(temporal, part.grid, cls_token=part.cls_token,
                                                         crops=part.crops)
                    part.repeats = matcher.video(part, out.frames, encoder.width)
                out.add(part)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; the rest is re-raised
                if not _is_out_of_memory(e):
                    raise
                if encoder.device.type == "cuda":
                    torch.cuda.empty_cache()
                if limit <= encoder.frames_per_unit:
                    raise VisionZipError(f"out of memory encoding a single frame on {encoder.device} ({str(e)[:120]}); "
                                         "free memory (other models), use a smaller dtype, or the CPU") from e
                limit = _unit_batch(encoder, max(1, limit // 2))
                log.warning("out of memory encoding on %s; retrying with batches of %d frames", encoder.device, limit)
                continue
            start = stop
        done += frames.shape[0]
        if progress is not None:
            progress(done, total or done)
    first = out.first
    if first is None:
        raise VisionZipError("no frames to encode")
    tokens, scores, assignment = out.result()
    video = CompressedVideo(
        tokens=tokens, timestamps=out.timestamps, indices=out.indices, method=settings.method,
        dominant=settings.dominant, contextual=settings.contextual, crops=first.crops, grid=first.grid,
        cls_token=first.cls_token, scores=scores, assignment=assignment, preprocess=encoder.preprocess_spec,
        source=str(source), meta=_counted_meta(first.meta, encoder, out.frames, done), positions=out.positions(),
        repeats=out.repeats(),
    )
    if temporal is not None and matcher is not None:
        temporal_stage.describe(video, temporal, matcher, encoder.width)
        if temporal.budget and video.total_tokens > temporal.budget:
            video = temporal_stage.fit(video, temporal, temporal.budget, width=encoder.width)
    return video



def _counted_meta(meta: dict[str, Any], encoder: Encoder, units: int, frames: int) -> dict[str, Any]:
    """``meta`` with how many sampled frames the encoded ones hold: Qwen's last temporal patch repeats its
    frame when the count is odd (recorded as ``repeated_frames``, so summaries count the true frames)."""
    meta = {k: v for k, v in meta.items() if k != "repeated_frames"}
    repeated = units * encoder.frames_per_unit - frames
    if repeated > 0:
        meta["repeated_frames"] = repeated
    return meta


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return torch.cat([p for p in parts if p is not None]) if parts and all(p is not None for p in parts) else None


class _Accumulator:
    """Compressed batches written into tensors allocated once for the planned frame count.

    Concatenating the parts at the end would hold the tokens twice; with the total known, the only
    memory that grows with the video is the tokens' own (and the small heatmap maps).
    """

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.first: CompressedVideo | None = None
        self.parts: list[CompressedVideo] = []  # when the total is unknown
        self.buffers: dict[str, torch.Tensor] = {}
        self.frames = 0
        self.rows = 0  # frames x crops written to the maps
        self.timestamps: list[float] = []
        self.indices: list[int] = []
        self.cells: list[torch.Tensor | None] = []
        self.sources: list[torch.Tensor | None] = []

    def positions(self) -> torch.Tensor | None:
        return _cat(self.cells)

    def repeats(self) -> torch.Tensor | None:
        return _cat(self.sources)

    def add(self, part: CompressedVideo) -> None:
        self.cells.append(part.positions)  # small per-frame maps: concatenated at the end
        self.sources.append(part.repeats)
        self.first = self.first or part
        self.timestamps += part.timestamps
        self.indices += part.indices
        fields = {"tokens": part.tokens, "scores": part.scores, "assignment": part.assignment}
        if not self.total or self.frames + part.num_frames > self.total or (
                self.buffers and part.tokens.shape[1:] != self.buffers["tokens"].shape[1:]):
            self._spill()
            self.parts.append(part)
            self.frames += part.num_frames
            return
        crops = max(part.crops, 1)
        for name, value in fields.items():
            if value is None:
                continue
            if name not in self.buffers:
                rows = self.total if name == "tokens" else self.total * crops
                self.buffers[name] = torch.empty((rows, *value.shape[1:]), dtype=value.dtype)
            if name == "tokens":
                self.buffers[name][self.frames: self.frames + value.shape[0]] = value
            else:
                self.buffers[name][self.rows: self.rows + value.shape[0]] = value
        self.frames += part.num_frames
        self.rows += part.num_frames * crops

    def _spill(self) -> None:
        """Fall back to a list of parts (a total that was wrong, or a change of shape)."""
        first = self.first
        if self.buffers and not self.parts and first is not None:
            self.parts.append(dataclasses.replace(
                first, tokens=self.buffers["tokens"][: self.frames],
                scores=self.buffers["scores"][: self.rows] if "scores" in self.buffers else None,
                assignment=self.buffers["assignment"][: self.rows] if "assignment" in self.buffers else None))
            self.buffers = {}
        self.total = None

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.parts:
            tokens = torch.cat([p.tokens for p in self.parts])
            return tokens, _cat([p.scores for p in self.parts]), _cat([p.assignment for p in self.parts])
        tokens = self.buffers["tokens"]
        tokens = tokens if self.frames == tokens.shape[0] else tokens[: self.frames].clone()
        maps = []
        for name in ("scores", "assignment"):
            value = self.buffers.get(name)
            maps.append(None if value is None else value if self.rows == value.shape[0] else value[: self.rows].clone())
        return tokens, maps[0], maps[1]



def video_source(vlm: VisionLanguageModel, source: Any, *, scale_at_decode: bool = True,
                 **sample_kwargs: Any) -> VideoHandle | FramesHandle:
    """A handle to stream ``source`` (a path, file object, VideoHandle or FramesHandle) for this model.

    File videos are scaled while decoding to what the model's encoder needs (a small margin above its
    input size, see :meth:`~comfy_visionzip.encoded.Encoder.decode_cover`) unless ``scale_at_decode``
    is off or the handle already says how to scale.
    """
    if isinstance(source, (VideoHandle, FramesHandle)):
        if sample_kwargs:
            raise VisionZipError(f"give sampling options ({', '.join(sample_kwargs)}) to the handle, not with it")
        handle = source
    else:
        handle = VideoHandle(source, **sample_kwargs)
    if scale_at_decode and isinstance(handle, VideoHandle) and handle.cover is None:
        handle = dataclasses.replace(handle, cover=vlm.video_encoder().decode_cover())
    return handle


def compress_video(
    vlm: VisionLanguageModel,
    source: Any,
    *,
    dominant: int = 54,
    contextual: int = 10,
    method: str = "visionzip",
    batch_size: int | None = None,
    progress: Progress | None = None,
    scale_at_decode: bool = True,
    temporal: Temporal | float | int | str | bool | None = None,
    compression: Compression | None = None,
    **sample_kwargs: Any,
) -> CompressedVideo:
    """Sample -> encode -> zip a video file (or a VideoHandle / FramesHandle) in chunks with this model.

    ``sample_kwargs`` are :func:`~comfy_visionzip.video.iter_video`'s (num_frames, fps, start, end, ...).
    Frames are scaled at decode time to what the encoder needs (``scale_at_decode``), decoding overlaps
    encoding, and ``batch_size`` None sizes the batch to the device (halved on out-of-memory).
    ``temporal`` drops tokens that repeat earlier frames' (see :mod:`comfy_visionzip.temporal`; a
    threshold, a token budget, True or a ``Temporal``). ``compression`` gives the settings at once, e.g.
    a :class:`~comfy_visionzip.budget.BudgetPlan`'s (which holds the temporal stage to the plan's room).
    Returns a :class:`~comfy_visionzip.tokens.CompressedVideo` labelled with the model it was made with.
    """
    settings = compression or Compression.parse(method=method, dominant=dominant, contextual=contextual,
                                                temporal=temporal)
    handle = video_source(vlm, source, scale_at_decode=scale_at_decode, **sample_kwargs)
    total = len(handle.plan()[0])
    encoder = vlm.video_encoder()
    if not batch_size:
        batch_size = auto_batch_size(encoder)
    video = stream(encoder, handle.iter(chunk_size=batch_size), settings, batch_size=batch_size, progress=progress,
                   total=total)
    return finish_video(vlm, handle, video)


def finish_video(vlm: VisionLanguageModel, handle: VideoHandle | FramesHandle,
                 video: CompressedVideo) -> CompressedVideo:
    """What :func:`compress_video` adds to the streamed tokens of ``handle``: the model's label, the video's
    duration, the seek note and the source."""
    label_tokens(vlm, video)
    video.meta["duration"] = handle.duration()
    note = handle.seek_note(video.indices) if isinstance(handle, VideoHandle) else ""
    if note:
        video.meta["seek"] = note
    video.source = str(handle.source)
    return video


def label_tokens(vlm: VisionLanguageModel, video: CompressedVideo | EncodedImages) -> None:
    """Record which model made the tokens (checked when they are answered from or loaded again)."""
    video.meta.update(model=vlm.name, **vlm.token_identity())
