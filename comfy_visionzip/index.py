"""Index a video library: every video becomes one tokens file in a folder (encode once, ask many times), with a
manifest of what was done; on this machine, or on a Ray cluster through Ray Data (:mod:`comfy_visionzip.ray_index`).
What a library, its manifest and the work on one source are: :mod:`comfy_visionzip.library`.

Locally one model is loaded (only when there is something to do); the next source is opened and decoded in a
background thread while the current one encodes (a bounded queue of decoded chunks), so the decoder never waits
for a file boundary.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import VisionZipError
from .library import (
    MANIFEST,
    VIDEO_SUFFIXES,
    IndexSettings,
    Job,
    Manifest,
    ModelSpec,
    Opened,
    answer_one,
    clean_partials,
    encode_source,
    failed_row,
    failed_unchanged,
    find_sources,
    is_up_to_date,
    locked,
    make_jobs,
    now,
    open_source,
    tokens_name,
)
from .models.base import VisionLanguageModel
from .pipeline import auto_batch_size
from .ray_index import answer_ray, run_ray
from .stream import prefetch

log = logging.getLogger(__name__)

__all__ = ["MANIFEST", "IndexReport", "IndexSettings", "Manifest", "ModelSpec", "ask_index", "find_sources",
           "index_library", "index_model", "locked", "run_local", "tokens_name"]

Progress = Callable[[float, int], None]


@dataclass
class IndexReport:
    """What a run did: rows written this run, by what happened to them."""

    indexed: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    up_to_date: list[dict[str, Any]] = field(default_factory=list)
    failed_before: list[dict[str, Any]] = field(default_factory=list)  # unchanged sources that failed earlier
    missing: list[str] = field(default_factory=list)  # arguments that named nothing
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.failed or self.failed_before or self.missing)

    def summary(self) -> str:
        parts = [f"{len(self.indexed)} indexed", f"{len(self.up_to_date)} up to date (skipped)",
                 f"{len(self.failed)} failed"]
        if self.failed_before:
            parts.append(f"{len(self.failed_before)} failed before and unchanged (not tried again: --retry-failed)")
        if self.missing:
            parts.append(f"{len(self.missing)} argument(s) named no file")
        frames = sum(int(r.get("frames") or 0) for r in self.indexed)
        return ", ".join(parts) + f"; {frames} frames encoded in {self.seconds:.1f} s"


# ------------------------------------------------------------------------------------------- local runs


class _End:
    """A source's last chunk has been handed on."""


_END = _End()


@dataclass
class _Failed:
    error: BaseException


def _decoded(vlm: VisionLanguageModel, jobs: Sequence[Job], settings: IndexSettings,
             batch: int) -> Iterator[tuple[Job, Opened | Any]]:
    """Every source opened and decoded in turn: (job, Opened), then (job, chunk)..., then (job, _END); a source
    that fails gives (job, _Failed) instead and the next one follows. Run ahead of the encoder by prefetch."""
    for job in jobs:
        try:
            opened = open_source(vlm, job, settings)
            yield job, opened
            for chunk in opened.handle.iter(chunk_size=batch):
                yield job, chunk
            yield job, _END
        except Exception as e:  # noqa: BLE001 - handed to the consumer as this source's failure
            yield job, _Failed(e)


def run_local(vlm: VisionLanguageModel, jobs: Sequence[Job], settings: IndexSettings, key: str, folder: Path,
              on_row: Callable[[dict[str, Any]], None], progress: Progress | None = None, depth: int = 2) -> None:
    """Index ``jobs`` with one model in this process; the next source decodes while the current one encodes."""
    batch = settings.batch_size or auto_batch_size(vlm.video_encoder())
    items = prefetch(_decoded(vlm, jobs, settings, batch), depth)
    try:
        for done, (job, first) in enumerate(items):
            started = time.perf_counter()
            ended = isinstance(first, _Failed)

            def chunks() -> Iterator[Any]:  # this source's chunks, up to its end
                nonlocal ended
                for _job, item in items:
                    ended = isinstance(item, (_End, _Failed))
                    if isinstance(item, _Failed):
                        raise item.error
                    if ended:
                        return
                    yield item

            def frames_done(n: int, total: int, _done: int = done) -> None:
                if progress is not None:
                    progress(_done + min(n / max(total, 1), 0.999), len(jobs))

            if isinstance(first, _Failed):
                row = failed_row(job, key, first.error)
            else:
                row = encode_source(vlm, job, first, chunks(), key, folder, started, batch=batch, prefetch_depth=0,
                                    progress=frames_done)
            if not ended:  # skip what was decoded of a source whose encoding failed
                for _job, item in items:
                    if isinstance(item, (_End, _Failed)):
                        break
            on_row(row)
            if progress is not None:
                progress(done + 1, len(jobs))
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


# ------------------------------------------------------------------------------------------- the job


def index_library(model: ModelSpec, arguments: Sequence[str], folder: str | os.PathLike[str],
                  settings: IndexSettings, *, vlm: VisionLanguageModel | None = None, ray: str | None = None,
                  actors: int | None = None, retry_failed: bool = False, progress: Progress | None = None,
                  say: Callable[[str], object] | None = None,
                  on_row: Callable[[dict[str, Any]], None] | None = None) -> IndexReport:
    """Index the videos ``arguments`` name (files, folders, glob patterns) into tokens files in ``folder``.

    Locally the model is ``vlm`` when given (it must be ``model`` loaded), else loaded only when something is to
    be done. ``ray``: None runs here; "" starts a local Ray on this machine (or uses the one this process
    started); an address joins that cluster (``folder`` and the model must then be on a filesystem every node
    shares). ``on_row`` sees each manifest row as it is written. Returns what was done; the manifest holds it all.
    """
    say = say or log.info
    started = time.perf_counter()
    out = Path(folder).absolute()
    if out.exists() and not out.is_dir():
        raise VisionZipError(f"{folder}: is a file; give a folder for the tokens files")
    key = settings.key(model.fingerprint())  # a missing model folder is refused before any video is listed
    sources, missing = find_sources(arguments, exclude=out)
    if not sources:
        raise VisionZipError("no videos found in " + ", ".join(arguments[:3]) +
                             " (folders are searched for " + ", ".join(VIDEO_SUFFIXES[:6]) + ", ...)")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise VisionZipError(f"{folder}: cannot write there (permission denied); choose another folder")
    report = IndexReport(missing=missing)
    with locked(out):
        manifest = Manifest(out)
        jobs, gone = make_jobs(sources)

        options = settings.describe()

        def record(row: dict[str, Any]) -> None:
            row["settings"] = options  # what the key stands for, readable
            manifest.put(row)
            (report.indexed if row["status"] == "ok" else report.failed).append(row)
            if on_row is not None:
                on_row(row)

        for source, line in gone:
            record(Job(source, 0, 0, tokens_name(source)).row(key, status="failed", error=line, frames=0,
                                                              visual_tokens=0, seconds=0.0, at=now()))
        todo = []
        for job in jobs:
            row = manifest.get(job.source)
            if row is not None and is_up_to_date(job, row, key, out):
                report.up_to_date.append(row)
            elif row is not None and failed_unchanged(job, row, key) and not retry_failed:
                report.failed_before.append(row)
            else:
                todo.append(job)
        say(f"{len(jobs)} source(s): {len(todo)} to index, {len(report.up_to_date)} up to date"
            + (f", {len(report.failed_before)} failed before and unchanged" if report.failed_before else "")
            + (f"; {len(missing)} argument(s) named no file: {', '.join(missing[:3])}" if missing else ""))
        clean_partials(out)
        if todo and ray is None:
            run_local(vlm or model.load(), todo, settings, key, out, record, progress)
        elif todo and ray is not None:
            run_ray(ray, model, todo, settings, key, out, record, actors=actors, progress=progress, say=say)
        clean_partials(out)
    report.seconds = time.perf_counter() - started
    return report


# ------------------------------------------------------------------------------------------- asking the index


def require_index(folder: str | os.PathLike[str]) -> Path:
    index = Path(folder).absolute()
    if not (index / MANIFEST).is_file():
        raise VisionZipError(f"{folder}: no {MANIFEST} there; make the index first (python -m comfy_visionzip "
                             "index VIDEOS --model M --out DIR)")
    return index


def index_model(folder: str | os.PathLike[str]) -> str:
    """The model folder an index was made with (what ``ask-index`` loads when no model is given)."""
    manifest = Manifest(require_index(folder))
    models = sorted({str(r["model"]) for r in manifest.ok_rows() if r.get("model")})
    if len(models) != 1:
        raise VisionZipError(f"{folder}: " + ("no indexed video names its model" if not models else
                                              f"videos were indexed with {len(models)} models") + ": give --model")
    return models[0]


def ask_index(model: ModelSpec, folder: str | os.PathLike[str], question: str, config: Any, *,
              where: str | None = None, out: str | os.PathLike[str] | None = None,
              vlm: VisionLanguageModel | None = None, ray: str | None = None, actors: int | None = None,
              timestamps: bool = True, on_answer: Callable[[dict[str, Any]], None] | None = None,
              say: Callable[[str], object] | None = None) -> tuple[list[dict[str, Any]], Path]:
    """Answer ``question`` about every indexed video in ``folder`` (those whose path or name match ``where``),
    one model for all; each answer goes to ``on_answer`` and to the JSON Lines file ``out`` (default: a new
    ``answers-TIME.jsonl`` in the folder) as it comes. Returns the answers and the file."""
    say = say or log.info
    if not question.strip():
        raise VisionZipError("the question is empty: give it in quotes")
    index = require_index(folder)
    manifest = Manifest(index)
    rows = manifest.ok_rows(where)
    if not rows:
        raise VisionZipError(f"no indexed video matches {where!r}" if where else
                             f"{folder}: the index has no video with tokens (see {MANIFEST})")
    target = Path(out) if out else index / f"answers-{datetime.now():%Y%m%d-%H%M%S}.jsonl"
    if target.is_dir() or not target.parent.is_dir():
        raise VisionZipError(f"{target}: give a file in an existing folder for the answers")
    say(f"{len(rows)} indexed video(s) to ask" + (f" (matching {where!r})" if where else ""))
    answers: list[dict[str, Any]] = []
    with open(target, "w", encoding="utf-8") as f:

        def take(answer: dict[str, Any]) -> None:
            answers.append(answer)
            f.write(json.dumps(answer, ensure_ascii=False) + "\n")
            f.flush()
            if on_answer is not None:
                on_answer(answer)

        if ray is None:
            vlm = vlm or model.load()
            for row in rows:
                take(answer_one(vlm, row, question, config, index, timestamps))
        else:
            answer_ray(ray, model, rows, question, config, index, take, actors=actors, timestamps=timestamps, say=say)
    return answers, target
