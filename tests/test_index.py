"""Indexing a video library (comfy_visionzip.index): tokens files + manifest, re-runs, failures, asking the index;
the same on a local Ray cluster (skipped without ray), including a worker killed mid-file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from comfy_visionzip import load_tokens, load_vlm
from comfy_visionzip.__main__ import main
from comfy_visionzip.answer import GenerationConfig
from comfy_visionzip.errors import VisionZipError
from comfy_visionzip.index import (
    MANIFEST,
    IndexSettings,
    Manifest,
    ModelSpec,
    ask_index,
    find_sources,
    index_library,
    locked,
    tokens_name,
)
from comfy_visionzip.store import save_tokens

FRAMES = ["--frames", "4"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llava")


@pytest.fixture()
def library(tmp_path, clip_factory):
    """3 good clips (two with the same file name in different folders) and a corrupt one."""
    lib = tmp_path / "lib"
    (lib / "sub").mkdir(parents=True)
    shutil.copy(clip_factory("a.mp4", frames=40), lib / "a.mp4")
    shutil.copy(clip_factory("b.mkv", frames=30, codec="libx264"), lib / "b.mkv")
    shutil.copy(clip_factory("a.mp4", frames=50), lib / "sub" / "a.mp4")
    (lib / "broken.mp4").write_bytes(b"\x00" * 4000)
    (lib / "notes.txt").write_text("not a video")
    return lib


def rows(out: Path) -> dict[str, dict]:
    return {Path(r["source"]).relative_to(out.parent / "lib").as_posix(): r for r in Manifest(out).rows.values()}


def test_index_then_rerun_then_touch(library, model, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", str(library), "--model", model, "--out", str(out), *FRAMES]) == 1  # one failed
    printed = capsys.readouterr().out
    assert "3 indexed, 0 up to date (skipped), 1 failed" in printed
    got = rows(out)
    assert sorted(got) == ["a.mp4", "b.mkv", "broken.mp4", "sub/a.mp4"]  # notes.txt is not a video: not listed
    assert got["broken.mp4"]["status"] == "failed" and "not a readable video file" in got["broken.mp4"]["error"]
    assert "\n" not in got["broken.mp4"]["error"] and not got["broken.mp4"]["error"].startswith(str(library))
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) == 3 and got["a.mp4"]["tokens"] != got["sub/a.mp4"]["tokens"]  # same name, no collision
    for name in ("a.mp4", "b.mkv", "sub/a.mp4"):
        r = got[name]
        assert r["status"] == "ok" and r["error"] is None and r["frames"] == 4 and r["visual_tokens"] == 4 * 64
        video = load_tokens(out / r["tokens"])
        assert video.num_frames == 4 and video.meta["index"]["settings_key"] == r["settings_key"]
        assert r["settings"]["sampling"] == {"seek": "exact", "num_frames": 4}
        assert r["size"] == os.path.getsize(library / name)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert not list(out.glob(".*.partial")) and not list(out.glob(".*.claim"))

    # a re-run does nothing (the broken file failed before and has not changed: still reported, exit code 1)
    assert main(["index", str(library), "--model", model, "--out", str(out), *FRAMES]) == 1
    printed = capsys.readouterr().out
    assert "0 indexed, 3 up to date (skipped), 0 failed, 1 failed before and unchanged" in printed
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == stamps

    # touching one source redoes only it
    later = time.time() + 5
    os.utime(library / "b.mkv", (later, later))
    spec = ModelSpec(model)
    settings = IndexSettings(sampling={"num_frames": 4})
    report = index_library(spec, [str(library)], out, settings)
    assert [Path(r["source"]).name for r in report.indexed] == ["b.mkv"]
    assert len(report.up_to_date) == 2 and len(report.failed_before) == 1 and not report.ok
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")
            if p.name != got["b.mkv"]["tokens"]} == {k: v for k, v in stamps.items() if k != got["b.mkv"]["tokens"]}
    assert len(Manifest(out).rows) == 4  # one row per source, still

    # other settings redo everything; --retry-failed tries the broken one again
    report = index_library(spec, [str(library)], out, IndexSettings(sampling={"num_frames": 3}))
    assert len(report.indexed) == 3 and len(report.failed) == 1
    report = index_library(spec, [str(library)], out, IndexSettings(sampling={"num_frames": 3}), retry_failed=True)
    assert len(report.up_to_date) == 3 and len(report.failed) == 1 and not report.failed_before


def test_tokens_from_the_index_answer_like_ask(library, model, tmp_path, capsys):
    out = tmp_path / "idx"
    video = library / "a.mp4"
    question = "What is in the video?"
    assert main(["index", str(video), "--model", model, "--out", str(out), *FRAMES]) == 0
    capsys.readouterr()
    assert main(["ask", str(video), question, "--model", model, *FRAMES, "--max-new-tokens", "6"]) == 0
    direct = [line for line in capsys.readouterr().out.splitlines() if line.startswith("A: ")]
    tokens = out / tokens_name(str(video))
    assert main(["ask", "-", question, "--model", model, "--tokens", str(tokens), "--max-new-tokens", "6"]) == 0
    stored = [line for line in capsys.readouterr().out.splitlines() if line.startswith("A: ")]
    assert direct == stored and len(direct) == 1
    answers = tmp_path / "answers.jsonl"
    assert main(["ask-index", str(out), question, "--max-new-tokens", "6", "--answers", str(answers)]) == 0
    printed = capsys.readouterr().out
    assert f"a.mp4: {direct[0][3:]}" in printed  # the model came from the index
    (row,) = [json.loads(line) for line in answers.read_text().splitlines()]
    assert row["answer"] == direct[0][3:].strip() and row["error"] is None and row["question"] == question


def test_ask_index_where_and_errors(library, model, tmp_path, capsys):
    out = tmp_path / "idx"
    main(["index", str(library), "--model", model, "--out", str(out), *FRAMES])
    capsys.readouterr()
    assert main(["ask-index", str(out), "Is it red?", "--where", "*sub*", "--max-new-tokens", "3",
                 "--answers", str(tmp_path / "x.jsonl")]) == 0
    lines = (tmp_path / "x.jsonl").read_text().splitlines()
    assert [Path(json.loads(x)["source"]).parent.name for x in lines] == ["sub"]
    assert main(["ask-index", str(out), "Is it red?", "--where", "*nothing*"]) == 2
    assert "no indexed video matches '*nothing*'" in capsys.readouterr().err
    assert main(["ask-index", str(tmp_path), "Is it red?"]) == 2
    assert "no index.jsonl there" in capsys.readouterr().err
    # a tokens file deleted by hand: that video's answer is an error line, the others answer
    first = next(r for r in Manifest(out).ok_rows())
    (out / first["tokens"]).unlink()
    assert main(["ask-index", str(out), "Is it red?", "--max-new-tokens", "3", "--answers",
                 str(tmp_path / "y.jsonl")]) == 1
    answers = [json.loads(x) for x in (tmp_path / "y.jsonl").read_text().splitlines()]
    assert sum(a["error"] is not None for a in answers) == 1 and sum(a["answer"] is not None for a in answers) == 2


def test_bad_input_is_one_line_before_loading(library, model, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", str(tmp_path / "nothing-*.mp4"), "--model", model, "--out", str(out)]) == 2
    assert "no videos found" in capsys.readouterr().err and not out.exists()
    assert main(["index", str(library), "--model", str(tmp_path / "no-model"), "--out", str(out)]) == 2
    assert "not a model folder" in capsys.readouterr().err and not out.exists()
    (tmp_path / "file").write_text("x")
    assert main(["index", str(library), "--model", model, "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["index", str(library), "--model", model, "--out", str(out), "--method", "bogus"]) == 2
    assert "unknown compression method" in capsys.readouterr().err
    # a missing argument among good ones is reported, the rest indexed, and the run says it failed
    assert main(["index", str(library / "a.mp4"), str(tmp_path / "gone.mp4"), "--model", model, "--out", str(out),
                 *FRAMES]) == 1
    assert "1 argument(s) named no file" in capsys.readouterr().out


def test_sources_and_names(tmp_path):
    (tmp_path / "v" / ".hidden").mkdir(parents=True)
    (tmp_path / "v" / "deep").mkdir()
    for name in ("v/x.MP4", "v/deep/y.webm", "v/.hidden/z.mp4", "v/readme.md", "v/.dot.mp4", "v/deep/clip.bin"):
        (tmp_path / name).write_bytes(b"x")
    found, missing = find_sources([str(tmp_path / "v"), str(tmp_path / "v" / "deep" / "clip.bin"),
                                   str(tmp_path / "v" / "**" / "*.webm"), str(tmp_path / "none*.mp4")])
    names = [Path(f).relative_to(tmp_path).as_posix() for f in found]
    assert names == ["v/x.MP4", "v/deep/y.webm", "v/deep/clip.bin"]  # given by name: taken whatever its suffix
    assert missing == [str(tmp_path / "none*.mp4")]
    assert tokens_name("/a/b/my clip (1).mp4") != tokens_name("/a/c/my clip (1).mp4")
    assert tokens_name("/a/b/my clip (1).mp4").startswith("my_clip_1-")


def test_second_run_on_a_held_folder_is_refused(library, model, tmp_path):
    out = tmp_path / "idx"
    out.mkdir()
    with locked(out), pytest.raises(VisionZipError, match="another index run is using this folder"):
        index_library(ModelSpec(model), [str(library / "a.mp4")], out, IndexSettings(sampling={"num_frames": 2}))


def test_a_file_that_breaks_mid_decode_does_not_spoil_the_next(library, model, tmp_path, monkeypatch):
    """The next file decodes ahead while the current one encodes: a file whose decoding fails after its first
    chunk gets its own failed row, and the file after it is whole and the same as indexed alone."""
    import comfy_visionzip.index as index
    from comfy_visionzip.errors import VideoError

    opened_for = index.open_source

    class Breaking:
        def __init__(self, handle):
            self.handle = handle

        def iter(self, chunk_size):
            chunks = self.handle.iter(chunk_size=chunk_size)
            yield next(chunks)
            raise VideoError("x.mp4", "corrupt data in the middle")

    def open_source(vlm, job, settings):
        opened = opened_for(vlm, job, settings)
        if Path(job.source).parent.name == "sub":
            opened.handle = Breaking(opened.handle)
        return opened

    monkeypatch.setattr(index, "open_source", open_source)
    out = tmp_path / "idx"
    vlm = load_vlm(model, device="cpu")
    sources = [str(library / "a.mp4"), str(library / "sub" / "a.mp4"), str(library / "b.mkv")]
    settings = IndexSettings(sampling={"num_frames": 8}, batch_size=2)
    report = index_library(ModelSpec(model), sources, out, settings, vlm=vlm)
    assert [Path(r["source"]).name for r in report.indexed] == ["a.mp4", "b.mkv"]
    assert [r["error"] for r in report.failed] == ["corrupt data in the middle"]  # the row names the file
    assert all(r["frames"] == 8 for r in report.indexed)
    alone = tmp_path / "alone"
    index_library(ModelSpec(model), [sources[2]], alone, settings, vlm=vlm)
    assert torch.equal(load_tokens(out / tokens_name(sources[2])).tokens,
                       load_tokens(alone / tokens_name(sources[2])).tokens)
    assert load_tokens(out / tokens_name(sources[2])).indices == load_tokens(alone / tokens_name(sources[2])).indices


def test_save_tokens_is_atomic(library, model, tmp_path, monkeypatch):
    out = tmp_path / "idx"
    index_library(ModelSpec(model), [str(library / "a.mp4")], out, IndexSettings(sampling={"num_frames": 2}))
    video = load_tokens(next(out.glob("*.safetensors")))
    import comfy_visionzip.store as store

    def fail(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "save_file", fail)
    with pytest.raises(OSError):
        save_tokens(video, tmp_path / "t.safetensors")
    assert list(tmp_path.glob("*t.safetensors*")) == []  # neither the final name nor a partial file


# ------------------------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster on 127.0.0.1 with 2 CPUs, for this module's Ray tests (skipped without ray)."""
    if os.environ.get("VISIONZIP_RAY_TESTS", "1") == "0":
        pytest.skip("Ray tests turned off (VISIONZIP_RAY_TESTS=0)")
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[data]')")
    if not hasattr(ray, "init"):  # Ray's session folder /tmp/ray seen as a namespace package, not Ray
        pytest.skip("ray is not installed (pip install 'ray[data]')")
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_gives_what_the_local_run_gives(library, model, tmp_path, local_ray):
    settings = IndexSettings(sampling={"num_frames": 4})
    local = index_library(ModelSpec(model), [str(library)], tmp_path / "local", settings)
    out = tmp_path / "ray"
    report = index_library(ModelSpec(model, device="cpu"), [str(library)], out, settings, ray="", actors=2)
    assert sorted(Path(r["source"]).name for r in report.indexed) == ["a.mp4", "a.mp4", "b.mkv"]
    assert [Path(r["source"]).name for r in report.failed] == ["broken.mp4"]
    assert {r["source"]: r["status"] for r in Manifest(out).rows.values()} == \
        {r["source"]: r["status"] for r in Manifest(tmp_path / "local").rows.values()}
    assert {r["settings_key"] for r in report.indexed} == {r["settings_key"] for r in local.indexed}
    for row in report.indexed:
        assert torch.allclose(load_tokens(out / row["tokens"]).tokens,
                              load_tokens(tmp_path / "local" / row["tokens"]).tokens, atol=1e-5)
    assert not list(out.glob(".*.claim"))
    # a re-run does nothing there either
    again = index_library(ModelSpec(model, device="cpu"), [str(library)], out, settings, ray="", actors=2)
    assert not again.indexed and len(again.up_to_date) == 3
    # ask-index through the command line on Ray gives the local answers
    answers = tmp_path / "answers.jsonl"
    assert main(["ask-index", str(out), "What is it?", "--max-new-tokens", "4", "--ray", "--actors", "2",
                 "--answers", str(answers), "--device", "cpu"]) == 0
    on_ray = [json.loads(line) for line in answers.read_text().splitlines()]
    local_answers, _ = ask_index(ModelSpec(model, device="cpu"), tmp_path / "local", "What is it?",
                                 GenerationConfig(max_new_tokens=4))
    assert len(on_ray) == 3 and all(a["error"] is None for a in on_ray)
    assert sorted((a["source"], a["answer"]) for a in on_ray) == sorted((a["source"], a["answer"])
                                                                       for a in local_answers)


def test_a_killed_ray_worker_loses_nothing(tmp_path, clip_factory, model, local_ray):
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(6):
        shutil.copy(clip_factory("k.mp4", frames=120 + i), lib / f"k{i}.mp4")
    out = tmp_path / "idx"
    settings = IndexSettings(sampling={"num_frames": 48})
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for claim in out.glob(".*.claim") if out.is_dir() else ():
                try:
                    pid = json.loads(claim.read_text())["pid"]
                except (OSError, ValueError):
                    continue
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    report = index_library(ModelSpec(model, device="cpu"), [str(lib)], out, settings, ray="", actors=2)
    thread.join(5)
    assert killed, "no worker was seen working (nothing to kill)"
    assert len(report.indexed) == 6 and not report.failed
    manifest = Manifest(out)
    assert len(manifest.rows) == 6 and all(r["status"] == "ok" and r["frames"] == 48 for r in manifest.rows.values())
    assert len(list(out.glob("*.safetensors"))) == 6 and not list(out.glob(".*.claim"))
    assert len((out / MANIFEST).read_text().splitlines()) == 6


def test_a_file_that_keeps_killing_its_worker_gets_a_failed_row(tmp_path, clip_factory, model, local_ray):
    """Each try leaves a claim when its worker dies; after three, the file is reported instead of tried forever."""
    from comfy_visionzip.ray_index import TRIES

    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(clip_factory("p.mp4", frames=200), lib / "poison.mp4")
    shutil.copy(clip_factory("k.mp4", frames=60), lib / "fine.mp4")
    out = tmp_path / "idx"
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:  # every worker that takes poison.mp4 dies
        while not stop.is_set():
            for claim in out.glob(".poison-*.claim") if out.is_dir() else ():
                try:
                    pid = json.loads(claim.read_text())["pid"]
                except (OSError, ValueError):
                    continue
                if pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        report = index_library(ModelSpec(model, device="cpu"), [str(lib)], out,
                               IndexSettings(sampling={"num_frames": 64}), ray="", actors=1)
    finally:
        stop.set()
        thread.join(5)
    assert len(killed) == TRIES
    assert [Path(r["source"]).name for r in report.indexed] == ["fine.mp4"]
    (failed,) = report.failed
    assert Path(failed["source"]).name == "poison.mp4"
    assert failed["error"].startswith(f"its Ray worker died {TRIES} times on this file")
    assert len(Manifest(out).rows) == 2 and not list(out.glob(".*.claim"))


def test_ray_problems_are_one_line_and_quick(library, model, tmp_path, monkeypatch, capsys):
    from comfy_visionzip.ray_index import _reachable

    started = time.monotonic()
    with pytest.raises(VisionZipError, match=r"no Ray cluster answers at 127\.0\.0\.1:1 .*ray start --head"):
        _reachable("127.0.0.1:1")
    assert time.monotonic() - started < 10
    _reachable("auto")  # not a host:port: left to Ray
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    assert main(["index", str(library / "a.mp4"), "--model", model, "--out", str(tmp_path / "idx"), "--ray"]) == 2
    assert capsys.readouterr().err.strip() == 'error: Ray is not installed: pip install "ray[data]" (or run without ' \
                                              '--ray)'


def test_ctrl_c_keeps_what_was_done(library, model, tmp_path, monkeypatch, capsys):
    import comfy_visionzip.library as rooms

    real = rooms.write_tokens
    calls = []

    def write_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rooms, "write_tokens", write_then_stop)
    out = tmp_path / "idx"
    assert main(["index", str(library / "a.mp4"), str(library / "b.mkv"), "--model", model, "--out", str(out),
                 *FRAMES]) == 130
    assert "interrupted: the videos finished so far are in the manifest" in capsys.readouterr().err
    assert [Path(r["source"]).name for r in Manifest(out).rows.values()] == ["a.mp4"]
    monkeypatch.setattr(rooms, "write_tokens", real)
    assert main(["index", str(library / "a.mp4"), str(library / "b.mkv"), "--model", model, "--out", str(out),
                 *FRAMES]) == 0
    assert "1 indexed, 1 up to date" in capsys.readouterr().out
