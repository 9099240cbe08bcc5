"""Index (and ask) a video library on a Ray cluster through Ray Data (``pip install "ray[data]"``; imported only
here, only when a Ray run is asked for).

The sources are a dataset of one row per file (one block each, so a retry redoes one file); a stateful
``map_batches`` keeps one model per actor (a GPU each when the cluster has GPUs, else a set number of CPU actors)
and writes each tokens file, atomically, into the index folder, which must be a path every node shares; the
driver streams the rows back and is the only writer of the manifest. An actor that dies mid-file is restarted by
Ray and the file is retried (Ray Data's actor defaults). While a worker holds a file it leaves a
``.NAME.PID.claim`` file beside the tokens files (what is in progress, and where); a worker that dies leaves
its claim behind, and a file with ``TRIES`` such claims gets a failed row instead of another try (a file that
crashes its decoder or runs out of memory does not retry forever). The driver removes claims when it ends.

Ray's own settings (dashboard, logging, memory, object store) are left to Ray: a run that starts a local cluster
calls plain ``ray.init()``; ``--ray ADDRESS`` joins an existing one. The pack ships its own code to the workers
(``runtime_env`` ``py_modules``), so every node needs only the dependencies (torch, transformers, av) installed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import VisionZipError
from .library import Job, answer_one, failed_row, index_one

log = logging.getLogger(__name__)

TRIES = 3  # a file is tried at most this many times when its worker dies (then it gets a failed row)


def _ray() -> Any:
    missing = VisionZipError('Ray is not installed: pip install "ray[data]" (or run without --ray)')
    try:
        import ray  # the optional "ray" extra
        import ray.data  # noqa: F401 - the Data library is what runs the job
    except ImportError:
        raise missing from None
    if not hasattr(ray, "init"):  # only Ray's session folder /tmp/ray on the path (a namespace package), not Ray
        raise missing
    return ray


def connect(address: str) -> Any:
    """Ray, connected: the cluster this process already joined, the one at ``address``, or (``""``) a new local
    one. Returns the ``ray`` module."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    _reachable(address)
    package = str(Path(__file__).resolve().parent)
    runtime_env = {"py_modules": [package], "excludes": ["__pycache__", "*.pyc"]}
    try:
        ray.init(address=address or None, runtime_env=runtime_env)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise VisionZipError(f"cannot reach a Ray cluster at {address or '(a new local one)'}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return ray


def _reachable(address: str, timeout: float = 3.0) -> None:
    """A host:port address answers, checked in seconds (Ray itself retries an unreachable one for minutes)."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", a cluster file's address: Ray finds it, or says it cannot
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise VisionZipError(f"no Ray cluster answers at {address} ({e.strerror or e}): start one with `ray start "
                             "--head` there, or give --ray alone for a local one") from None


def _actors(ray: Any, actors: int | None, items: int) -> tuple[int, dict[str, Any]]:
    """(actors, their resources): one per GPU when the cluster has GPUs, else ``actors`` (default: one per four
    CPUs) sharing the CPUs (Ray gives each as many torch threads as CPUs it holds), never more than the items."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return max(1, min(actors or gpus, items)), {"num_gpus": 1}
    cpus = max(1, int(resources.get("CPU", 1)))
    count = max(1, min(actors or max(1, cpus // 4), items))
    return count, {"num_cpus": max(1, cpus // count)}


class _Indexer:
    """A Ray Data actor: loads the model once, then indexes one source per call."""

    def __init__(self, model: Any, settings: Any, key: str, folder: str) -> None:
        self.model, self.settings, self.key, self.folder = model, settings, key, Path(folder)
        self.vlm = model.load()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        rows = []
        for i in range(len(batch["source"])):
            job = Job(str(batch["source"][i]), int(batch["size"][i]), int(batch["mtime_ns"][i]),
                      str(batch["tokens"][i]))
            died = list(self.folder.glob(f".{job.tokens}.*.claim"))  # left by workers that died on this file
            if len(died) >= TRIES:
                row = failed_row(job, self.key, f"its Ray worker died {len(died)} times on this file (out of memory, "
                                                "or a crash in the decoder): see the Ray logs")
            else:
                claim = self.folder / f".{job.tokens}.{os.getpid()}.claim"
                claim.write_text(json.dumps({"source": job.source, "pid": os.getpid(), "host": os.uname().nodename}))
                row = index_one(self.vlm, job, self.settings, self.key, self.folder)
                claim.unlink(missing_ok=True)
            row["worker"] = f"{os.uname().nodename}:{os.getpid()}"
            rows.append(json.dumps(row))
        return {"row": rows}


class _Answerer:
    """A Ray Data actor: loads the model once, then answers the question about one tokens file per call."""

    def __init__(self, model: Any, question: str, config: Any, folder: str, timestamps: bool) -> None:
        self.vlm = model.load()
        self.question, self.config, self.folder, self.timestamps = question, config, Path(folder), timestamps

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        rows = [json.dumps(answer_one(self.vlm, json.loads(str(r)), self.question, self.config, self.folder,
                                           self.timestamps))
                for r in batch["row"]]
        return {"answer": rows}


def _map(ray: Any, items: list[dict[str, Any]], actor: type, kwargs: dict[str, Any], actors: int | None,
         say: Callable[[str], object]) -> Any:
    count, resources = _actors(ray, actors, len(items))
    say(f"Ray: {len(items)} item(s) on {count} actor(s) ({', '.join(f'{k}={v}' for k, v in resources.items())} each)")
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    # Ray Data restarts a dead actor and retries its file (its defaults); _Indexer bounds the tries per file
    strategy = ray.data.ActorPoolStrategy(size=count, max_tasks_in_flight_per_actor=1)
    return dataset.map_batches(actor, fn_constructor_kwargs=kwargs, batch_size=1, compute=strategy, **resources)


def run_ray(address: str, model: Any, jobs: Sequence[Any], settings: Any, key: str, folder: Path,
            on_row: Callable[[dict[str, Any]], None], *, actors: int | None = None,
            progress: Callable[[float, int], None] | None = None,
            say: Callable[[str], object] = log.info) -> None:
    """Index ``jobs`` on Ray; ``on_row`` (the driver's manifest) sees each row as a file completes."""
    ray = connect(address)
    items = [{"source": j.source, "size": j.size, "mtime_ns": j.mtime_ns, "tokens": j.tokens} for j in jobs]
    results = _map(ray, items, _Indexer, {"model": model, "settings": settings, "key": key, "folder": str(folder)},
                   actors, say)
    seen: set[str] = set()
    try:
        for record in results.iter_rows():
            row = json.loads(record["row"])
            if row["source"] in seen:  # a retried file is written once more; the manifest keeps one row
                continue
            seen.add(row["source"])
            on_row(row)
            if progress is not None:
                progress(len(seen), len(jobs))
    except Exception as e:  # noqa: BLE001 - Ray's own failure (the cluster went away): what is done is kept
        raise VisionZipError(f"the Ray job stopped: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                             f"({len(seen)} of {len(jobs)} files done and recorded; run again to go on)") from None
    for job in jobs:
        if job.source not in seen:
            on_row(failed_row(job, key, "no result came back from Ray for this file: see the Ray logs"))


def answer_ray(address: str, model: Any, rows: Sequence[dict[str, Any]], question: str, config: Any, folder: Path,
               on_answer: Callable[[dict[str, Any]], None], *, actors: int | None = None, timestamps: bool = True,
               say: Callable[[str], object] = log.info) -> None:
    """Answer ``question`` about each indexed row on Ray; ``on_answer`` sees each answer as it comes."""
    ray = connect(address)
    items = [{"row": json.dumps(r)} for r in rows]
    results = _map(ray, items, _Answerer, {"model": model, "question": question, "config": config,
                                           "folder": str(folder), "timestamps": timestamps}, actors, say)
    seen: set[str] = set()
    for record in results.iter_rows():
        answer = json.loads(record["answer"])
        if answer["source"] not in seen:
            seen.add(answer["source"])
            on_answer(answer)
    for row in rows:
        if row["source"] not in seen:
            on_answer({"source": row["source"], "tokens": row["tokens"], "question": question, "answer": None,
                       "error": "no answer came back from Ray for this file: see the Ray logs"})
