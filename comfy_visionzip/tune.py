"""Label-free projector tuning for compressed tokens, by self-distillation (the paper's VisionZip‡, without its
instruction data).

The teacher is the checkpoint itself seeing every visual token; the student is the same checkpoint seeing only
the compressed tokens, through a trainable copy of its projector; everything else is frozen. On the user's own
frames, the teacher writes its answers to a few generic prompts (greedy), and the student learns to give the
teacher's next-token distributions while reading the teacher's text.

What exactly is distilled, and why:
  - **positions**: the teacher's answer tokens (and its end of turn) by default (``positions="answer"``): that
    is where the visual content decides the next token; the prompt's own text after the visual tokens
    (``positions="all"``) adds positions whose distribution hardly depends on the picture (compared on the
    probe model: see bench/bench_tune.py and the README);
  - **targets**: the teacher's full distribution, kept as its ``top_k`` most likely tokens plus one bucket for
    the rest (the "dark knowledge" a single label lacks; a fixed size per position, so the cache stays small);
  - **temperature** ``temperature`` on both sides (T^2-scaled KL, as in Hinton et al.);
  - **the text** is the teacher's own (the student is taught to continue what the full-token model says, not
    what a dataset says), so no labels are needed; the prompts are generic (``DEFAULT_PROMPTS``) or the
    user's own questions (answers never needed).

Full tokens: the pack sends full (uncompressed) tokens through the model's own projector even when an adapter is
loaded (:meth:`~comfy_visionzip.models.base.VisionLanguageModel.projector_for`), so an adapter cannot change full-
token answers. Forced through a projector tuned on compressed tokens alone, full tokens answer worse (on the probe
model 0.824 -> 0.694). ``anchor`` > 0 mixes that share of each step's samples read from the *full* tokens through
the tuned projector, with the same teacher targets (their loss starts at zero: the student is then the teacher),
which holds the projector nearer the model's own; measured on the probe (at lr 1e-3) it barely helps (forced full
0.694 -> 0.710 at ``anchor=0.25``) and costs compressed accuracy (VisionZip at 25 tokens 0.721 -> 0.700), so it is
off by default (bench/results/tune_anchor.md). A labelled sample's anchor is its answers read from the full tokens.
The loss at full tokens through the tuned projector (what it would do there) is recorded either way
(``full_tokens_loss_after``: on held-out samples with an anchor; without one, no sample is trained at full tokens,
so on up to 64 samples of every tenth clip).

Supervised tuning (a control, and for users who have answers): ``labels={file: [(question, answer), ...]}``
makes those files' samples the given questions with the given answers as one-hot targets (the same loss is
then the answers' cross-entropy; no teacher runs for them). A labelled file is one sample of its
``frames_per_video`` frames (its answers are about the whole file).

Memory: frames are encoded one sample at a time; the full tokens live only while the teacher answers, then
only the compressed tokens and the teacher's top-k targets are kept (and written to the work folder, so an
interrupted tuning resumes without asking the teacher again). The checkpoint folder is only read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .adapter import Adapter, model_identity, projector_of, supports
from .answer import Chat, GenerationConfig
from .errors import VisionZipError
from .pipeline import compress_encoded, label_tokens
from .prompt import placeholder
from .video import sample_video
from .zip import split_tokens

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("Describe this image in detail.", "What is happening here?", "What objects are there, and where?",
                   "What colors stand out?")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METHODS = ("visionzip", "pool", "uniform")  # the pack's compressions (full needs no adapter)
POSITIONS = ("answer", "all")
FULL_CHECK = 10  # without an anchor, every token of every 10th clip is kept to measure the full-token loss


@dataclass(frozen=True)
class TuneSettings:
    """How an adapter is tuned (see the module's docstring for what each choice means)."""

    tokens_per_frame: int = 64
    method: str = "visionzip"
    minutes: float = 30.0  # the whole tuning: the teacher's answers, then training until the time is up
    steps: int | None = None  # stop after this many optimiser steps (None: when the minutes are up)
    frames_per_video: int = 8  # frames sampled from each video (an image is one frame)
    frames_per_sample: int = 1  # frames one prompt shows (consecutive frames of one video)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    answer_tokens: int = 32  # what the teacher writes per prompt at most (greedy)
    positions: str = "answer"
    temperature: float = 1.0
    top_k: int = 32
    lr: float = 1e-4
    batch: int = 4  # samples per optimiser step (gradients accumulated)
    held_out: float = 0.1  # share of samples kept aside to measure the distillation loss before and after
    anchor: float = 0.0  # share of each step's samples read from the full tokens (0: none; see the docstring)
    seed: int = 0

    def check(self) -> None:
        problems = []
        if not isinstance(self.tokens_per_frame, int) or self.tokens_per_frame < 2:
            problems.append(f"tokens_per_frame must be an integer >= 2, not {self.tokens_per_frame!r}")
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not (isinstance(self.minutes, (int, float)) and 0 < self.minutes <= 24 * 60):
            problems.append(f"minutes must be more than 0 and at most a day, not {self.minutes!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            problems.append(f"steps must be a positive integer, not {self.steps!r}")
        for name in ("frames_per_video", "frames_per_sample", "answer_tokens", "top_k", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, not {value!r}")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            problems.append("prompts must be a non-empty list of questions")
        if self.positions not in POSITIONS:
            problems.append(f"positions must be one of {', '.join(POSITIONS)}, not {self.positions!r}")
        if not (isinstance(self.temperature, (int, float)) and 0.1 <= self.temperature <= 10):
            problems.append(f"temperature must be between 0.1 and 10, not {self.temperature!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            problems.append(f"lr must be between 0 and 1, not {self.lr!r}")
        if not (isinstance(self.anchor, (int, float)) and 0 <= self.anchor < 1):
            problems.append(f"anchor must be at least 0 and below 1, not {self.anchor!r}")
        if not (isinstance(self.held_out, (int, float)) and 0 <= self.held_out < 0.9):
            problems.append(f"held_out must be between 0 and 0.9, not {self.held_out!r}")
        if problems:
            raise VisionZipError("; ".join(problems))

    @property
    def counts(self) -> tuple[int, int]:
        """(dominant, contextual): the paper's split of ``tokens_per_frame`` (the baselines keep their sum)."""
        return split_tokens(self.tokens_per_frame)


@dataclass
class Sample:
    """One prompt about one short clip: the student's compressed tokens, its prompt ids, and the teacher's text
    and targets (top-k ids and probabilities, and the rest's mass, per distilled position)."""

    tokens: torch.Tensor  # (frames, K, D) compressed, float16
    times: list[float]
    prompt_ids: list[int]  # the student's prompt (compressed placeholders) up to the answer
    answer_ids: list[int]  # the teacher's answer (and its end of turn when it stopped)
    first: int  # where distilled positions start, counted back from the end of prompt_ids (answer: 0)
    top_ids: torch.Tensor  # (positions, top_k) int64
    top_probs: torch.Tensor  # (positions, top_k + 1) float32: the teacher's top-k probabilities and the rest
    crops: int = 1  # images the tower saw per frame (anyres tiles)
    frame_size: list[int] | None = None  # (H, W) of the frames (the family's arranging may need it)
    full_tokens: torch.Tensor | None = None  # (frames, crops * T, D) every token, float16 (with an anchor, or
    # for the full-token check; one tensor shared by the samples of a clip)
    full_prompt_ids: list[int] | None = None  # the teacher's prompt up to the answer (full placeholders)

    def full(self) -> Sample:
        """The anchor: the same targets read from every token."""
        assert self.full_tokens is not None and self.full_prompt_ids is not None
        return Sample(self.full_tokens, self.times, self.full_prompt_ids, self.answer_ids, self.first, self.top_ids,
                      self.top_probs, self.crops, self.frame_size)


@dataclass
class TuneResult:
    adapter: Adapter
    path: str
    steps: int
    seconds: float
    held_out_before: float | None  # mean distillation loss on held-out samples with the model's own projector
    held_out_after: float | None  # the same with the tuned one
    history: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- data


def source_frames(path: str, frames: int) -> tuple[torch.Tensor, list[float]]:
    """(T, H, W, 3) uint8 frames and their times: an image file is one frame, a video is sampled evenly."""
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - a user's file: say which and why in one line
            raise VisionZipError(f"{os.path.basename(path)}: cannot read it as an image ({type(e).__name__})") from e
        return torch.from_numpy(array.copy())[None], [0.0]
    clip = sample_video(path, num_frames=frames)
    return clip.frames, [float(t) for t in clip.timestamps]


def _sources_key(sources: Sequence[str]) -> list[list[Any]]:
    out = []
    for path in sources:
        stat = os.stat(path)
        out.append([os.path.basename(path), stat.st_size, int(stat.st_mtime)])
    return out


class _Student:
    """The same model reading compressed tokens through a trainable projector copy; everything else frozen."""

    def __init__(self, vlm: Any, settings: TuneSettings) -> None:
        self.vlm = vlm
        self.settings = settings
        own = projector_of(vlm.model)
        self.projector = copy.deepcopy(own).to(vlm.device, torch.float32).train()
        for p in self.projector.parameters():
            p.requires_grad_(True)
        for p in vlm.model.parameters():
            p.requires_grad_(False)
        self.embed = vlm.model.get_input_embeddings()

    def logits(self, sample: Sample, method: str, token_id: int, projector: Any = None) -> torch.Tensor:
        """The student's logits at the distilled positions ((positions, vocab), float32)."""
        vlm = self.vlm
        projector = projector or self.projector
        ids = sample.prompt_ids + sample.answer_ids
        tokens = sample.tokens.to(vlm.device, torch.float32)
        projected = projector(tokens)
        arranged = vlm.family.arrange(vlm, projected, method=method, crops=sample.crops,
                                      frame_size=sample.frame_size, keep=None).to(vlm.dtype)
        part = torch.tensor([ids], device=vlm.device)
        emb = self.embed(part)
        mask = part[0] == token_id
        if int(mask.sum()) != arranged.shape[0]:
            raise VisionZipError(f"internal: {int(mask.sum())} placeholders for {arranged.shape[0]} visual tokens")
        emb = emb.clone()
        emb[0, mask] = arranged
        out = vlm.model(inputs_embeds=emb, use_cache=False)
        start = len(sample.prompt_ids) - 1 - sample.first
        end = len(ids) - 1
        return out.logits[0, start:end].float()


def _targets(logits: torch.Tensor, top_k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    rest = (1 - top.values.sum(-1, keepdim=True)).clamp_min(0)
    return top.indices, torch.cat([top.values, rest], dim=-1)


def distill_loss(student_logits: torch.Tensor, top_ids: torch.Tensor, top_probs: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """KL(teacher || student) per position over the teacher's top-k tokens and one bucket for the rest, mean over
    positions, times T^2."""
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    picked = log_q.gather(-1, top_ids)
    rest = torch.log1p(-picked.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    log_q_all = torch.cat([picked, rest], dim=-1)
    p = top_probs
    kl = (p * (torch.log(p.clamp_min(1e-12)) - log_q_all)).sum(-1)
    return kl.mean() * temperature ** 2


# ------------------------------------------------------------------------------------------- the teacher


def _answer_ids(vlm: Any, answer: str) -> list[int]:
    ids = vlm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise VisionZipError(f"the answer {answer!r} has no tokens: give a non-empty answer")
    return [int(i) for i in ids] + [_eos(vlm)]


def _teacher_samples(vlm: Any, sources: Sequence[str], settings: TuneSettings,
                     progress: Callable[[str, int, int], None] | None,
                     deadline: float, labels: dict[str, list[tuple[str, str]]] | None = None) -> list[Sample]:
    encoder = vlm.video_encoder()
    dominant, contextual = settings.counts
    config = GenerationConfig(max_new_tokens=settings.answer_tokens, temperature=0.0)
    labels = labels or {}
    samples: list[Sample] = []
    clips: list[tuple[torch.Tensor, list[float], list[tuple[str, str]] | None]] = []
    for path in sources:
        frames, times = source_frames(path, settings.frames_per_video)
        if path in labels:  # labelled: one sample of the whole file, asked its own questions
            clips.append((frames, times, labels[path]))
            continue
        for i in range(0, len(frames), settings.frames_per_sample):
            clips.append((frames[i: i + settings.frames_per_sample], times[i: i + settings.frames_per_sample], None))
    total = sum(len(qa) if qa is not None else len(settings.prompts) for *_x, qa in clips)
    done = 0
    for number, (frames, times, qa) in enumerate(clips):
        if time.monotonic() > deadline and samples:
            log.info("time is up while the teacher answers: %d samples", len(samples))
            break
        with torch.inference_mode():
            encoded = encoder.encode(frames)
        encoded.timestamps, encoded.indices = list(times), list(range(len(times)))
        # the full tokens for the teacher and the anchor (a labelled clip brings its own answers)
        full = None if qa is not None and not settings.anchor else \
            compress_encoded(encoder, encoded, dominant=0, contextual=0, method="full", keep_maps=False)
        small = compress_encoded(encoder, encoded, dominant=dominant, contextual=contextual, method=settings.method,
                                 keep_maps=False)
        del encoded
        for video in (full, small):
            if video is not None:
                video.timestamps = list(times)
                label_tokens(vlm, video)
        student_chat = Chat(vlm, small)
        builder = student_chat.prompt
        size = small.meta.get("frame_size")
        frame_size = [int(x) for x in size] if size else None
        # every token is kept for the anchor (each clip), and for measuring what the tuned projector does at full
        # tokens (every FULL_CHECK-th clip: every token costs ~9x the compressed tokens' memory)
        keep_full = full is not None and (settings.anchor > 0 or number % FULL_CHECK == 0)
        full_tokens = full.tokens.to(torch.float16) if keep_full and full is not None else None
        if qa is not None:
            full_chat = Chat(vlm, full) if full is not None and full_tokens is not None else None
            for question, reply in qa:
                ids = _answer_ids(vlm, reply)
                asked = [{"role": "user", "text": question}]
                student_prompt = builder.ids(student_chat.prompt_video(), asked)
                full_prompt = builder.ids(full_chat.prompt_video(), asked) if full_chat is not None else None
                samples.append(Sample(small.tokens.to(torch.float16), list(times), list(student_prompt), ids, 0,
                                      torch.tensor(ids)[:, None], torch.tensor([[1.0, 0.0]] * len(ids)),
                                      int(small.crops), frame_size, full_tokens, full_prompt))
                done += 1
                if progress is not None:
                    progress("teacher", done, total)
            continue
        assert full is not None
        teacher = Chat(vlm, full)  # projected once per clip, forked per prompt
        for prompt in settings.prompts:
            chat = teacher.fork()
            chat.ask(prompt, config)
            turn = chat.turns[0]
            prompt_len = turn.prefill_tokens + turn.cached_tokens
            answer = chat.conversation_ids[prompt_len:]
            if turn.new_tokens < settings.answer_tokens:  # it stopped by itself: the student learns to stop too
                answer = answer + [_eos(vlm)]
            teacher_ids = chat.conversation_ids[:prompt_len] + answer
            student_prompt = builder.ids(student_chat.prompt_video(), [{"role": "user", "text": prompt}])
            suffix = 0
            if settings.positions == "all":  # the text after the last visual token, the same on both sides
                last = max(i for i, t in enumerate(student_prompt) if t == builder.token_id)
                suffix = len(student_prompt) - 1 - last - 1
            with torch.inference_mode():
                emb = chat._embed(teacher_ids, 0)
                logits = vlm.model(inputs_embeds=emb, use_cache=False).logits[0].float()
            start = prompt_len - 1 - suffix
            top_ids, top_probs = _targets(logits[start: len(teacher_ids) - 1], settings.top_k, settings.temperature)
            samples.append(Sample(small.tokens.to(torch.float16), list(times), list(student_prompt), answer, suffix,
                                  top_ids.cpu(), top_probs.cpu(), int(small.crops), frame_size, full_tokens,
                                  list(teacher_ids[:prompt_len]) if full_tokens is not None else None))
            done += 1
            if progress is not None:
                progress("teacher", done, total)
    if not samples:
        raise VisionZipError("no frames to tune on: give videos or images")
    return samples


def _eos(vlm: Any) -> int:
    eos = vlm.tokenizer.eos_token_id
    if eos is None:
        eos = vlm.model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return int(eos)


def _save_samples(path: Path, samples: list[Sample]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta = []
    shared: dict[int, str] = {}  # a clip's full tokens are stored once
    for i, s in enumerate(samples):
        tensors[f"{i}.tokens"] = s.tokens.contiguous()
        tensors[f"{i}.top_ids"] = s.top_ids.contiguous()
        tensors[f"{i}.top_probs"] = s.top_probs.contiguous()
        full = None
        if s.full_tokens is not None:
            full = shared.setdefault(id(s.full_tokens), f"{i}.full")
            if full == f"{i}.full":
                tensors[full] = s.full_tokens.contiguous()
        meta.append({"times": s.times, "prompt": s.prompt_ids, "answer": s.answer_ids, "first": s.first,
                     "crops": s.crops, "frame_size": s.frame_size, "full": full, "full_prompt": s.full_prompt_ids})
    save_file(tensors, str(path), metadata={"samples": json.dumps(meta)})


def _load_samples(path: Path) -> list[Sample] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["samples"])
        tensors = load_file(str(path))
        return [Sample(tensors[f"{i}.tokens"], m["times"], m["prompt"], m["answer"], m["first"],
                       tensors[f"{i}.top_ids"], tensors[f"{i}.top_probs"], m["crops"], m["frame_size"],
                       tensors[m["full"]] if m.get("full") else None, m.get("full_prompt"))
                for i, m in enumerate(meta)]
    except Exception:  # noqa: BLE001 - a cut-short cache is made again
        return None


# ------------------------------------------------------------------------------------------- tuning


def _work_folder(out: Path) -> Path:
    return out.with_name(f".{out.name}.work")


def check_output(vlm: Any, out: str | os.PathLike[str]) -> Path:
    """Where the adapter goes: a .safetensors file in an existing folder, never inside the checkpoint's folder."""
    target = Path(out).expanduser()
    if target.suffix != ".safetensors":
        raise VisionZipError(f"{target.name}: an adapter file name ends in .safetensors")
    if not target.parent.is_dir():
        raise VisionZipError(f"{target.parent}: no such folder to write the adapter into")
    model = Path(vlm.path).resolve()
    if target.parent.resolve() == model or model in target.parent.resolve().parents:
        raise VisionZipError("the adapter would be written into the model's folder; the tuning never changes a "
                             "checkpoint: write it somewhere else")
    return target


def tune_projector(vlm: Any, sources: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                   settings: TuneSettings | None = None, resume: bool = True,
                   progress: Callable[[str, int, int], None] | None = None,
                   say: Callable[[str], object] | None = None,
                   labels: dict[str, Sequence[tuple[str, str]]] | None = None) -> TuneResult:
    """Tune ``vlm``'s projector for ``settings.method`` at ``settings.tokens_per_frame`` on ``sources`` (video or
    image files) by self-distillation, and write the adapter to ``out`` (see the module's docstring).

    ``progress(stage, done, total)`` reports "teacher" (prompts answered) and "train" (steps; total is an
    estimate while the time limit decides); raising from it stops (what was done is kept for ``resume``).
    ``labels`` (file -> [(question, answer)]) tunes those files on the given answers instead of the teacher's.
    """
    settings = settings or TuneSettings()
    settings.check()
    say = say or log.info
    supports(vlm)
    paths = [os.fspath(s) for s in sources]
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        raise VisionZipError(f"no such file: {', '.join(missing[:3])}" if missing else
                             "no videos or images to tune on")
    target = check_output(vlm, out)
    given = {os.fspath(k): [(str(q), str(a)) for q, a in v] for k, v in (labels or {}).items()}
    unknown = [os.path.basename(k) for k in given if k not in paths]
    if unknown:
        raise VisionZipError(f"labels for files that are not tuned on: {', '.join(unknown[:3])}")
    dominant, contextual = settings.counts
    spec = vlm.video_encoder().preprocess_spec  # the counts checked against the tower before any work (an anyres
    # model counts its tiles for a frame size: any size will do for the check)
    vlm.family.layout(vlm, method=settings.method, dominant=dominant, contextual=contextual,
                      frame_size=(spec.tile, spec.tile) if spec.pinpoints else None)
    identity = model_identity(vlm)
    started = time.monotonic()
    work = _work_folder(target)
    plan = {"model": identity, "sources": _sources_key(paths), "labels": sorted(given.items()),
            "settings": {k: v for k, v in asdict(settings).items() if k not in ("minutes", "steps")}}
    plan_key = hashlib.sha256(json.dumps(plan, sort_keys=True, default=list).encode()).hexdigest()[:16]
    state_file, samples_file = work / "state.safetensors", work / "samples.safetensors"
    if work.is_dir() and (not resume or _read_key(work) != plan_key):
        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    (work / "plan.json").write_text(json.dumps({"key": plan_key, **plan}, default=list))
    used = _read_used(state_file) if resume else 0.0
    deadline = started + settings.minutes * 60 - used
    samples = _load_samples(samples_file) if resume and samples_file.is_file() else None
    if samples is None:
        free = len(paths) - len(given)
        say(f"the teacher (full tokens) answers {len(settings.prompts)} prompts about the frames of {free} file(s)"
            + (f"; {len(given)} labelled file(s) bring their own answers" if given else "") if free else
            f"{len(given)} labelled file(s): tuning on their answers (no teacher)")
        samples = _teacher_samples(vlm, paths, settings, progress, deadline, given)
        _save_samples(samples_file, samples)
    else:
        say(f"resuming: the teacher's {len(samples)} answers reused")
    _kind, token_id, _text = placeholder(vlm)  # the LLaVA families' placeholder (what the prompts were built with)
    rng = np.random.default_rng(settings.seed)
    order = rng.permutation(len(samples))
    held = [samples[i] for i in order[: int(len(samples) * settings.held_out)]] if len(samples) >= 10 else []
    train = [samples[i] for i in order[len(held):]]
    student = _Student(vlm, settings)
    opt = torch.optim.AdamW(student.projector.parameters(), lr=settings.lr, weight_decay=0.0)
    step = 0
    history: list[float] = []
    if resume and state_file.is_file():
        step, history = _load_state(state_file, student.projector, opt)
        say(f"resuming at step {step}")
    before = _held_loss(student, held, token_id, settings, projector=projector_of(vlm.model)) \
        if held else None
    anchors = anchor_count(settings)
    if settings.anchor and not anchors:
        say(f"a batch of {settings.batch} has no room for an anchor sample: no anchor (use a batch of 2 or more)")
    torch.manual_seed(settings.seed + step)
    last_save = time.monotonic()
    per_step = None
    try:
        while True:
            now = time.monotonic()
            if settings.steps is not None and step >= settings.steps:
                break
            if settings.steps is None and now >= deadline and step > 0:
                break
            t = time.monotonic()
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for j in range(settings.batch):
                sample = train[int(rng.integers(len(train)))]
                method = settings.method
                if j < anchors and sample.full_tokens is not None:  # the anchor: the same targets from every token
                    sample, method = sample.full(), "full"
                loss = distill_loss(student.logits(sample, method, token_id), sample.top_ids.to(vlm.device),
                                    sample.top_probs.to(vlm.device), settings.temperature) / settings.batch
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(student.projector.parameters(), 1.0)
            opt.step()
            step += 1
            history.append(round(total, 5))
            per_step = time.monotonic() - t if per_step is None else 0.9 * per_step + 0.1 * (time.monotonic() - t)
            if progress is not None:
                left = settings.steps - step if settings.steps is not None else \
                    max(0, math.ceil((deadline - time.monotonic()) / max(per_step, 1e-3)))
                progress("train", step, step + left)
            if time.monotonic() - last_save > 60:
                _save_state(state_file, student.projector, opt, step, history, used + time.monotonic() - started)
                last_save = time.monotonic()
    except BaseException:
        _save_state(state_file, student.projector, opt, step, history, used + time.monotonic() - started)
        raise
    after = _held_loss(student, held, token_id, settings) if held else None
    # what the tuned projector does at full tokens (the teacher scores about 0 there): on held-out samples, or,
    # when no sample was trained at full tokens (no anchor), on any (at most 64)
    pool = held if settings.anchor > 0 else samples
    held_full = [s.full() for s in pool if s.full_tokens is not None][:64]
    full_after = _held_loss(student, held_full, token_id, settings, method="full") if held_full else None
    seconds = used + time.monotonic() - started
    adapter = Adapter(
        weights={k: v.detach().cpu() for k, v in student.projector.state_dict().items()},
        model=identity,
        tuned_for={"method": settings.method, "dominant": dominant, "contextual": contextual,
                   "tokens_per_frame": settings.tokens_per_frame},
        data={"files": [p[0] for p in plan["sources"]], "samples": len(samples), "prompts": list(settings.prompts),
              "labelled_files": len(given),
              "frames_per_video": settings.frames_per_video, "frames_per_sample": settings.frames_per_sample},
        settings={"positions": settings.positions, "anchor": settings.anchor, "anchor_per_step": anchors,
                  "temperature": settings.temperature, "top_k": settings.top_k,
                  "lr": settings.lr, "batch": settings.batch, "steps": step, "seconds": round(seconds, 1),
                  "held_out_loss_before": before, "held_out_loss_after": after,
                  "full_tokens_loss_after": full_after,
                  "loss_first": history[:1], "loss_last": history[-1:]})
    path = adapter.save(target)
    shutil.rmtree(work, ignore_errors=True)
    say(f"adapter written to {target.name} after {step} steps in {seconds / 60:.1f} min"
        + (f"; held-out distillation loss {before:.4f} -> {after:.4f}" if before is not None else "")
        + (f" (at full tokens {full_after:.4f})" if full_after is not None else ""))
    return TuneResult(adapter, path, step, seconds, before, after, history)


def anchor_count(settings: TuneSettings) -> int:
    """Anchor samples per step (the first ones of each batch): the share ``anchor`` of the batch, at least one
    when there is an anchor and a batch of two or more, never the whole batch."""
    if not settings.anchor or settings.batch < 2:
        return 0
    return min(settings.batch - 1, max(1, round(settings.batch * settings.anchor)))


def _held_loss(student: _Student, held: list[Sample], token_id: int, settings: TuneSettings,
               projector: Any = None, method: str | None = None) -> float:
    with torch.no_grad():
        losses = [float(distill_loss(student.logits(s, method or settings.method, token_id, projector=projector),
                                     s.top_ids.to(student.vlm.device), s.top_probs.to(student.vlm.device),
                                     settings.temperature)) for s in held]
    return float(f"{float(np.mean(losses)):.6g}")  # six significant digits: small losses stay comparable


def _read_key(work: Path) -> str | None:
    try:
        return json.loads((work / "plan.json").read_text()).get("key")
    except (OSError, ValueError):
        return None


def _read_used(path: Path) -> float:
    try:
        with safe_open(str(path), framework="pt") as f:
            return float((f.metadata() or {}).get("seconds", 0.0))
    except Exception:  # noqa: BLE001 - no state yet
        return 0.0


def _save_state(path: Path, projector: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                history: list[float], seconds: float) -> None:
    tensors = {f"projector.{k}": v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    names = {id(p): n for n, p in projector.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"opt.{names[id(p)]}.{key}"] = value.detach().cpu().reshape(value.shape).contiguous()
    staging = path.with_name(path.name + ".partial")
    save_file(tensors, str(staging), metadata={"step": str(step), "seconds": str(seconds),
                                               "history": json.dumps(history)})
    os.replace(staging, path)


def _load_state(path: Path, projector: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[float]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    projector.load_state_dict({k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")})
    params = dict(projector.named_parameters())
    for name, p in params.items():
        state = {key.split(".")[-1]: v.to(p.device) for key, v in tensors.items()
                 if key.startswith(f"opt.{name}.")}
        if state:
            opt.state[p] = state
    return int(meta.get("step", 0)), json.loads(meta.get("history", "[]"))

