"""A video library as the index sees it: the settings every tokens file is made with, the sources (files, folders,
glob patterns) and their tokens files' names, the manifest, and the work on one source (index it, ask about it),
which the local job (:mod:`comfy_visionzip.index`) and the Ray workers (:mod:`comfy_visionzip.ray_index`) share.

The unit of work and of exchange is the tokens file (:mod:`comfy_visionzip.store`): each source's file is named
after the source and a hash of its absolute path (two sources never collide), written atomically, and records in its
metadata the source's size and modification time and the key of the settings it was made with. The manifest
(``index.jsonl`` in the folder: one JSON row per source, rewritten atomically as each source completes) says, for
every source: path, size, mtime, settings (and their key), tokens file, frames, visual tokens, seconds, status and
the error line. A source is up to date when its row is ``ok``, its tokens file is there and the file's own metadata
still matches the source's size, mtime and the settings; a failed source whose size and mtime have not changed is
not tried again unless asked (``retry_failed``). Only the process that runs the job writes the manifest (the Ray
driver, never its workers); a lock file keeps a second run off the same folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .answer import Chat
from .budget import plan_budget
from .errors import VideoError, VisionZipError
from .models.base import VisionLanguageModel
from .pipeline import auto_batch_size, finish_video, stream
from .settings import Compression
from .store import FORMAT, load_tokens, read_metadata, save_tokens
from .video import FramesHandle, VideoHandle
from .vlm import load_vlm

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MANIFEST = "index.jsonl"
LOCK = ".index.lock"
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mkv", ".mov", ".avi", ".webm", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".wmv",
                  ".flv", ".3gp", ".ogv", ".gif")
DEFAULT_FRAMES = 16  # as `ask`: frames sampled when no plan and no budget is given
# The budget planner counts a whole first prompt: the index does not know the questions yet, so it counts one of
# a typical length (answers reserve max_new_tokens, as in `ask`).
PLANNING_QUESTION = "What happens in this video, and when? Describe the main events in order."
SAMPLING_KEYS = ("num_frames", "fps", "every", "start", "end", "max_frames", "seek")


@dataclass(frozen=True)
class IndexSettings:
    """What every tokens file of an index is made with (the options ``ask`` has for sampling, budget and
    compression). ``workers`` and ``batch_size`` change only the speed, so they are not part of :meth:`key`."""

    compression: Compression = field(default_factory=Compression)
    sampling: dict[str, Any] = field(default_factory=dict)  # num_frames, fps, every, start, end, max_frames, seek
    budget: int = 0  # tokens the whole prompt + answer may use (0: the model's context)
    policy: str = "fit"
    context: int | None = None
    max_new_tokens: int = 256
    timestamps: bool = True
    batch_size: int = 0  # frames per encoder batch (0: sized to the device)
    workers: int | None = None  # decode processes (None: chosen per video)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise VisionZipError(f"unknown sampling options {', '.join(unknown)}; valid: {', '.join(SAMPLING_KEYS)}")
        if not isinstance(self.budget, int) or self.budget < 0:
            raise VisionZipError(f"budget must be >= 0 tokens (0 = the model's context), not {self.budget!r}")
        if self.policy not in ("fit", "strict"):
            raise VisionZipError(f"policy must be fit or strict, not {self.policy!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise VisionZipError(f"max_new_tokens must be a positive integer, not {self.max_new_tokens!r}")

    def plan_kwargs(self) -> dict[str, Any]:
        kwargs = {k: v for k, v in self.sampling.items() if v is not None}
        if not any(k in kwargs for k in ("num_frames", "fps", "every")) and not self.budget:
            kwargs["num_frames"] = DEFAULT_FRAMES
        return kwargs

    def describe(self) -> dict[str, Any]:
        """The settings as plain data (what the manifest shows and :meth:`key` hashes)."""
        return {"compression": json.loads(json.dumps(dataclasses.asdict(self.compression), default=str)),
                "sampling": {"seek": "exact", **{k: v for k, v in self.plan_kwargs().items() if v is not None}},
                "budget": self.budget, "policy": self.policy, "context": self.context,
                "max_new_tokens": self.max_new_tokens, "timestamps": self.timestamps}

    def key(self, model: dict[str, Any]) -> str:
        """A short hash of what a tokens file's content depends on: these settings, the model
        (:meth:`ModelSpec.fingerprint`) and the tokens-file format."""
        blob = json.dumps({"settings": self.describe(), "model": model, "format": FORMAT}, sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Job:
    """One source to index: where it is, what it was when listed, and its tokens file's name."""

    source: str  # absolute path
    size: int
    mtime_ns: int
    tokens: str  # file name inside the index folder

    def row(self, settings_key: str, **extra: Any) -> dict[str, Any]:
        return {"source": self.source, "size": self.size, "mtime_ns": self.mtime_ns, "settings_key": settings_key,
                "tokens": self.tokens, **extra}


# ------------------------------------------------------------------------------------------- sources


def tokens_name(source: str) -> str:
    """The tokens file's name for ``source``: its stem (made safe) and a hash of its absolute path."""
    path = os.path.abspath(source)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._")[:60] or "video"
    return f"{stem}-{hashlib.sha256(path.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}.safetensors"


def find_sources(arguments: Sequence[str], *, exclude: str | os.PathLike[str] | None = None) -> tuple[list[str],
                                                                                                        list[str]]:
    """(absolute paths of the sources, arguments that named nothing). A file is taken whatever its name; a
    folder gives the video files under it (by suffix, hidden folders and ``exclude`` skipped); anything else
    is a glob pattern (``**`` spans folders) whose files are taken and whose folders are walked."""
    out: dict[str, None] = {}
    missing: list[str] = []
    skip = os.path.abspath(exclude) if exclude is not None else None

    def walk(folder: str) -> None:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.join(root, d) != skip)
            for name in sorted(files):
                if name.lower().endswith(VIDEO_SUFFIXES) and not name.startswith("."):
                    out[os.path.abspath(os.path.join(root, name))] = None

    for argument in arguments:
        if os.path.isfile(argument):
            out[os.path.abspath(argument)] = None
        elif os.path.isdir(argument):
            walk(argument)
        else:
            matches = sorted(glob.glob(argument, recursive=True)) if glob.has_magic(argument) else []
            for match in matches:
                if os.path.isfile(match):
                    out[os.path.abspath(match)] = None
                elif os.path.isdir(match):
                    walk(match)
            if not matches:
                missing.append(argument)
    return list(out), missing


def make_jobs(sources: Sequence[str]) -> tuple[list[Job], list[tuple[str, str]]]:
    """Jobs for the sources that can be listed, and (source, error) for those that vanished meanwhile."""
    jobs, gone = [], []
    for source in sources:
        try:
            st = os.stat(source)
        except OSError as e:
            gone.append((source, f"cannot read the file ({e.strerror or e})"))
            continue
        jobs.append(Job(source, st.st_size, st.st_mtime_ns, tokens_name(source)))
    return jobs, gone


# ------------------------------------------------------------------------------------------- the manifest


class Manifest:
    """``index.jsonl``: one row per source (the last written wins when reading a file edited by hand)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        self.rows[str(row["source"])] = row
                    except (ValueError, KeyError, TypeError):
                        log.warning("%s line %d is not a manifest row: ignored (its source will be indexed again)",
                                    self.path.name, number)

    def get(self, source: str) -> dict[str, Any] | None:
        return self.rows.get(source)

    def put(self, row: dict[str, Any]) -> None:
        self.rows[row["source"]] = row
        self.save()

    def save(self) -> None:
        partial = self.path.with_name(f".{MANIFEST}.{os.getpid()}.partial")
        with open(partial, "w", encoding="utf-8") as f:
            for row in self.rows.values():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(partial, self.path)

    def ok_rows(self, where: str | None = None) -> list[dict[str, Any]]:
        """Rows of sources with a tokens file, matching the shell pattern ``where`` on the path or the name."""
        rows = [r for r in self.rows.values() if r.get("status") == "ok"]
        if where:
            rows = [r for r in rows if fnmatch.fnmatch(r["source"], where)
                    or fnmatch.fnmatch(os.path.basename(r["source"]), where)]
        return rows


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the index folder for this run: a second run on the same folder is refused in one line."""
    if fcntl is None:  # Windows: no advisory locks here; one run at a time is the user's care
        yield
        return
    with open(folder / LOCK, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise VisionZipError(f"{folder}: another index run is using this folder; wait for it to end") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def tokens_meta(path: Path) -> dict[str, Any] | None:
    """The ``index`` record a tokens file carries (None for a file that is not a complete tokens file: its source
    is then indexed again)."""
    meta = read_metadata(path)
    record = (meta or {}).get("meta", {}).get("index") if isinstance((meta or {}).get("meta"), dict) else None
    return dict(record) if isinstance(record, dict) and record else None


def is_up_to_date(job: Job, row: dict[str, Any], key: str, folder: Path) -> bool:
    if row.get("status") != "ok" or row.get("settings_key") != key:
        return False
    if row.get("size") != job.size or row.get("mtime_ns") != job.mtime_ns:
        return False
    record = tokens_meta(folder / str(row.get("tokens")))
    return bool(record) and record == {"size": job.size, "mtime_ns": job.mtime_ns, "settings_key": key}


def failed_unchanged(job: Job, row: dict[str, Any], key: str) -> bool:
    return row.get("status") == "failed" and row.get("settings_key") == key and row.get("size") == job.size and \
        row.get("mtime_ns") == job.mtime_ns


def one_line(error: BaseException) -> str:
    """An error as the one line a manifest row keeps (a bug says so: it is not the user's input)."""
    text = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, VideoError):  # the row names the file: the problem and the hint are what is left to say
        text = error.problem + (f" ({error.hint})" if error.hint else "")
        return (text.strip().splitlines() or [""])[0]
    if isinstance(error, VisionZipError):
        return text
    if isinstance(error, OSError):
        return f"{error.strerror or text}" + (f": {os.path.basename(str(error.filename))}" if error.filename else "")
    return f"unexpected {type(error).__name__}: {text} (a bug: please report it with the file's codec)"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------- one source


@dataclass
class Opened:
    """A source opened and planned: the handle to sample, the compression for it and its frame count."""

    handle: VideoHandle | FramesHandle
    compression: Compression
    frames: int
    plan: str


def open_source(vlm: VisionLanguageModel, job: Job, settings: IndexSettings) -> Opened:
    """Plan ``job``'s frames as ``ask`` does (the budget planner fitting a first prompt into the context)."""
    plan = plan_budget(vlm, job.source, PLANNING_QUESTION, budget=settings.budget, policy=settings.policy,
                       compression=settings.compression, max_new_tokens=settings.max_new_tokens,
                       timestamps=settings.timestamps, context=settings.context, workers=settings.workers,
                       **settings.plan_kwargs())
    return Opened(plan.video, plan.compression, plan.frames, plan.summary())


def write_tokens(vlm: VisionLanguageModel, job: Job, opened: Opened, video: Any, key: str, folder: Path,
                 seconds: float) -> dict[str, Any]:
    """Label, record and write one source's tokens (atomically) and return its manifest row."""
    video = finish_video(vlm, opened.handle, video)
    video.meta["index"] = {"size": job.size, "mtime_ns": job.mtime_ns, "settings_key": key}
    save_tokens(video, folder / job.tokens)
    return job.row(key, status="ok", error=None, frames=video.num_frames, visual_tokens=int(video.total_tokens),
                   seconds=round(seconds, 2), model=os.path.abspath(vlm.path), summary=video.summary(), at=now())


def encode_source(vlm: VisionLanguageModel, job: Job, opened: Opened, chunks: Iterable[Any], key: str,
                  folder: Path, started: float, *, batch: int, prefetch_depth: int = 1,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Encode and zip an opened source's decoded ``chunks`` and write its tokens file; its row (a failure is a
    failed row)."""
    try:
        video = stream(vlm.video_encoder(), chunks, opened.compression, batch_size=batch, progress=progress,
                       total=opened.frames, prefetch_depth=prefetch_depth)
        return write_tokens(vlm, job, opened, video, key, folder, time.perf_counter() - started)
    except Exception as e:  # noqa: BLE001 - one source's failure is its row; the run goes on
        return failed_row(job, key, e, time.perf_counter() - started)


def index_one(vlm: VisionLanguageModel, job: Job, settings: IndexSettings, key: str, folder: Path,
              progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Index one source in this process (what each Ray worker runs); a failure is returned as a failed row."""
    started = time.perf_counter()
    try:
        opened = open_source(vlm, job, settings)
    except Exception as e:  # noqa: BLE001 - one source's failure is its row; the run goes on
        return failed_row(job, key, e, time.perf_counter() - started)
    batch = settings.batch_size or auto_batch_size(vlm.video_encoder())
    return encode_source(vlm, job, opened, opened.handle.iter(chunk_size=batch), key, folder, started, batch=batch,
                         progress=progress)


def failed_row(job: Job, key: str, error: BaseException | str, seconds: float = 0.0) -> dict[str, Any]:
    """A failed source's row; an error that is not the input's (a bug) is also logged with its traceback."""
    if isinstance(error, BaseException) and not isinstance(error, (VisionZipError, OSError)):
        log.error("indexing %s failed", job.source, exc_info=error)
    line = error if isinstance(error, str) else one_line(error)
    return job.row(key, status="failed", error=line, frames=0, visual_tokens=0, seconds=round(seconds, 2), at=now())


# ------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSpec:
    """The model an index is made with, as :func:`~comfy_visionzip.vlm.load_vlm` loads it (here, or on each Ray
    worker: then ``path`` must be readable on every node)."""

    path: str
    device: str = "auto"
    dtype: str = "auto"
    adapter: str | None = None
    allow_pickle: bool = False

    def load(self) -> VisionLanguageModel:
        return load_vlm(self.path, device=self.device, dtype=self.dtype, allow_pickle=self.allow_pickle,
                        adapter=self.adapter)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the model without loading it: its configuration files' contents, its weight files'
        names and sizes, and the adapter file's contents (tokens files are checked against the loaded model
        again when they are read)."""
        if not os.path.isdir(self.path):
            raise VisionZipError(f"{self.path}: not a model folder; give the checkpoint's folder")
        h = hashlib.sha256()
        for name in sorted(os.listdir(self.path)):
            full = os.path.join(self.path, name)
            if name.endswith(".json") and os.path.isfile(full):
                h.update(name.encode() + b"\0" + Path(full).read_bytes())
            elif name.endswith((".safetensors", ".bin", ".pt", ".pth")):
                h.update(f"{name}\0{os.path.getsize(full)}".encode())
        adapter = None
        if self.adapter:
            try:
                adapter = hashlib.sha256(Path(self.adapter).read_bytes()).hexdigest()[:16]
            except OSError as e:
                raise VisionZipError(f"{self.adapter}: cannot read the adapter ({e.strerror or e})") from None
        return {"model": h.hexdigest()[:16], "adapter": adapter}


def clean_partials(folder: Path) -> None:
    """Remove what killed runs left half-written, and Ray workers' claims (called while this run holds the
    folder)."""
    for partial in [*folder.glob(".*.partial"), *folder.glob(".*.claim")]:
        with contextlib.suppress(OSError):
            partial.unlink()


# ------------------------------------------------------------------------------------------- asking one source


def answer_one(vlm: VisionLanguageModel, row: dict[str, Any], question: str, config: Any, folder: Path,
               timestamps: bool = True) -> dict[str, Any]:
    """The answer to ``question`` about one indexed source (an error is returned as the row's error line)."""
    started = time.perf_counter()
    out: dict[str, Any] = {"source": row["source"], "tokens": row["tokens"], "question": question}
    try:
        video = load_tokens(folder / str(row["tokens"]), model=vlm)
        chat = Chat(vlm, video, timestamps=timestamps)
        answer = chat.ask(question, config)
        turn = chat.turns[-1]
        out.update(answer=answer.strip(), error=None, frames=video.num_frames, visual_tokens=int(video.total_tokens),
                   new_tokens=turn.new_tokens,
                   note="; ".join(n for n in (chat.note, chat.adapter_note) if n) or None)
    except Exception as e:  # noqa: BLE001 - one file's failure is its answer row; the others go on
        if not isinstance(e, (VisionZipError, OSError)):
            log.exception("answering about %s failed", row["source"])
        out.update(answer=None, error=one_line(e))
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out
