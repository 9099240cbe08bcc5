"""Tiny random-weight checkpoints of every supported family, saved the way real ones are, for the demo
and tests.

Nothing is downloaded: the configs are built here (vision hidden 32, a few layers; text hidden 32, two
layers), the tokenizer is a word-level vocabulary made from scratch, and the folder gets the same
files a Hugging Face checkpoint has (config.json, model.safetensors, tokenizer files, the image and
video processor configs, a chat template). Loading it goes through the real loader
(:func:`comfy_visionzip.vlm.load_vlm`). Which transformers class a family is comes from its family
module (:data:`comfy_visionzip.models.FAMILIES`); what is here is only each tiny config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ..models import FAMILIES as FAMILY_MODULES

Json = dict[str, Any]

FAMILIES = ("llava", "llava_next", "llava_next_video", "video_llava", "llava_onevision")

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
WORDS = ["USER", "ASSISTANT", ":", "What", "is", "in", "this", "image", "video", "?", "Describe", "the", "a", ".",
         "frame", "at", "s", "happens", "and", "then", "who", "color", "pancake", "flips", "kitchen"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_tokenizer(vocab_size: int = 512, *, special: list[str] = SPECIAL, words: list[str] = WORDS,
                   template: str = CHAT_TEMPLATE, unk: str = "<unk>", bos: str | None = "<s>", eos: str = "</s>",
                   pad: str = "<pad>") -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer of ``special`` + ``words`` (+ filler words up to ``vocab_size``) with a chat template."""
    vocab = {t: i for i, t in enumerate(special + words)}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(special)
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=pad,
        padding_side="left", model_input_names=["input_ids", "attention_mask"], chat_template=template,
    )


def _clip(image_size: int, patch: int) -> tf.CLIPVisionConfig:
    return tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=image_size, patch_size=patch, projection_dim=32)


def _siglip(image_size: int, patch: int) -> tf.SiglipVisionConfig:
    return tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=patch, vision_use_head=False)


def _clip_processor(size: int, pinpoints: list[list[int]] | None = None, kind: str = "CLIPImageProcessor") -> Json:
    config = {
        "image_processor_type": kind, "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
    }
    if pinpoints:
        config.update(image_grid_pinpoints=pinpoints, do_pad=True)
    return config


def _video_processor(image_processor: Json, kind: str) -> Json:
    video = {k: v for k, v in image_processor.items()
             if k not in ("image_processor_type", "image_grid_pinpoints", "do_pad")}
    return {**video, "video_processor_type": kind}


# Each tiny LLaVA-family config: (n: image side, patch, pinpoints, ids) -> (config kwargs, image processor,
# video processor or None). The family module names the transformers class; its config_class builds the config.
TinySpec = Callable[[int, int, list[list[int]], dict[str, int]], tuple[Json, Json, Json | None]]


def _llava(n: int, patch: int, pinpoints: list[list[int]], ids: dict[str, int]) -> tuple[Json, Json, Json | None]:
    return {"vision_config": _clip(n, patch), "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default"}, _clip_processor(n), None


def _llava_next(n: int, patch: int, pinpoints: list[list[int]], ids: dict[str, int]) -> tuple[Json, Json, Json | None]:
    config = {"vision_config": _clip(n, patch), "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
              "image_grid_pinpoints": pinpoints}
    return config, _clip_processor(n, pinpoints, "LlavaNextImageProcessor"), None


def _llava_next_video(n: int, patch: int, pinpoints: list[list[int]],
                      ids: dict[str, int]) -> tuple[Json, Json, Json | None]:
    config = {"vision_config": _clip(n, patch), "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
              "image_grid_pinpoints": pinpoints, "video_token_index": ids["video"], "spatial_pool_mode": "average",
              "spatial_pool_stride": 2}
    return (config, _clip_processor(n, pinpoints, "LlavaNextImageProcessor"),
            _video_processor(_clip_processor(n), "LlavaNextVideoVideoProcessor"))


def _video_llava(n: int, patch: int, pinpoints: list[list[int]], ids: dict[str, int]) -> tuple[Json, Json, Json | None]:
    config = {"vision_config": _clip(n, patch), "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
              "video_token_index": ids["video"]}
    image = _clip_processor(n, kind="VideoLlavaImageProcessor")
    return config, image, _video_processor(image, "VideoLlavaVideoProcessor")


def _onevision(n: int, patch: int, pinpoints: list[list[int]], ids: dict[str, int]) -> tuple[Json, Json, Json | None]:
    grid = [[n * a, n * b] for a in (1, 2) for b in (1, 2)]
    config = {"vision_config": _siglip(n, patch), "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
              "video_token_index": ids["video"], "image_grid_pinpoints": grid, "vision_aspect_ratio": "anyres_max_9"}
    square = {"height": n, "width": n}
    common = {"do_resize": True, "size": square, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}
    image = {"image_processor_type": "LlavaOnevisionImageProcessor", **common, "do_pad": True,
             "image_grid_pinpoints": grid}
    return config, image, {"video_processor_type": "LlavaOnevisionVideoProcessor", **common}


TINY: dict[str, TinySpec] = {"llava": _llava, "llava_next": _llava_next, "llava_next_video": _llava_next_video,
                             "video_llava": _video_llava, "llava_onevision": _onevision}


def build_tiny(family: str, folder: str | os.PathLike[str], *, image_size: int = 48, patch: int = 6,
               seed: int = 0) -> str:
    """Create and save a tiny random checkpoint of ``family`` (a model_type) in ``folder``; returns the folder."""
    if family in TINY_QWEN:
        return build_tiny_qwen(family, folder, seed=seed)
    if family not in TINY:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(ALL_FAMILIES)}")
    torch.manual_seed(seed)
    tok = make_tokenizer()
    text = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vocab = tok.get_vocab()
    ids = {"image": vocab["<image>"], "video": vocab["<video>"]}
    n = image_size
    pinpoints = [[n, 2 * n], [2 * n, n], [2 * n, 2 * n]]
    own, image_proc, video_proc = TINY[family](n, patch, pinpoints, ids)
    cls = getattr(tf, FAMILY_MODULES[family].class_name)
    config = cls.config_class(text_config=text, image_token_index=ids["image"], projector_hidden_act="gelu", **own)
    return save_checkpoint(folder, cls(config), tok, image_proc, video_proc)


def save_checkpoint(folder: str | os.PathLike[str], model: Any, tokenizer: Any, image_processor: Json,
                    video_processor: Json | None = None, chat_template: str = CHAT_TEMPLATE) -> str:
    """Write a model folder the way a Hugging Face checkpoint is laid out (weights, tokenizer, processor
    configs, chat template), so it is loaded with the real loading code; returns the folder."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _portable_tokenizer_config(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(image_processor, f, indent=2)
    if video_processor is not None:
        with open(os.path.join(folder, "video_preprocessor_config.json"), "w") as f:
            json.dump(video_processor, f, indent=2)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(chat_template)
    return folder


def _portable_tokenizer_config(folder: str) -> None:
    """transformers 5 names its tokenizer class ``TokenizersBackend``, which 4.x does not know (and 4.x writes
    ``PreTrainedTokenizer``); both load the same tokenizer.json as ``PreTrainedTokenizerFast``, so the folder says
    that (one folder for the whole supported range)."""
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    if config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizer"):  # 5.x; 4.x writes the latter
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w") as f:
            json.dump(config, f, indent=2)


# ---------------------------------------------------------------------------------------- Qwen families

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
QWEN_WORDS = ["system", "user", "assistant", "You", "are", "helpful", "seconds", "<", ">", *"0123456789", *WORDS[3:]]

# The Qwen2.5-VL chat template (ChatML; a default system message; vision parts as vision_start + pad + vision_end)
QWEN2_5_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's template renders vision parts the same way and has no default system message
QWEN3_VL_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string %}{{ message['content'] }}{%- else %}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{ content['text'] }}{%- endif %}{%- endfor %}{%- endif %}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def make_qwen_tokenizer(template: str, vocab_size: int = 512) -> tf.PreTrainedTokenizerFast:
    """The Qwen families' special tokens (ChatML, vision start/end, image/video pads), no BOS."""
    return make_tokenizer(vocab_size, special=QWEN_SPECIAL, words=QWEN_WORDS, template=template, unk="<|endoftext|>",
                          bos=None, eos="<|im_end|>", pad="<|endoftext|>")


def _qwen2_5_vl(patch: int, text: Json, ids: Json) -> Any:
    factor = patch * 2
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=patch, spatial_merge_size=2,
                  temporal_patch_size=2, tokens_per_second=2, window_size=factor * 2, out_hidden_size=32,
                  fullatt_block_indexes=[1, 3])
    rope = {"rope_type": "default", "mrope_section": MROPE, "rope_theta": 1000000.0}
    if _major() < 5:  # 4.x keeps the text settings on the top config
        legacy: Json = {"rope_scaling": {"type": "mrope", "mrope_section": MROPE}}
        config = tf.Qwen2_5_VLConfig(vision_config=vision, **text, **legacy, **ids)
    else:
        config = tf.Qwen2_5_VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **ids)
    config.bos_token_id = None  # the word-level vocabulary has no BOS (the real one is past its end)
    return config


def _qwen3_vl(patch: int, text: Json, ids: Json) -> Any:
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=patch, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    rope = {"rope_type": "default", "mrope_section": MROPE, "mrope_interleaved": True, "rope_theta": 5000000.0}
    return tf.Qwen3VLConfig(text_config={**text, "head_dim": 8, "rope_parameters": rope}, vision_config=vision, **ids)


MROPE = [2, 1, 1]  # head_dim 8: (time, height, width) sections of its 4 rotary frequencies
# model_type -> (config builder, chat template, video processor class)
TINY_QWEN: dict[str, tuple[Callable[[int, Json, Json], Any], str, str]] = {
    "qwen2_5_vl": (_qwen2_5_vl, QWEN2_5_VL_TEMPLATE, "Qwen2VLVideoProcessor"),
    "qwen3_vl": (_qwen3_vl, QWEN3_VL_TEMPLATE, "Qwen3VLVideoProcessor"),
}
QWEN_FAMILIES = tuple(TINY_QWEN)
ALL_FAMILIES = FAMILIES + QWEN_FAMILIES


def build_tiny_qwen(family: str, folder: str | os.PathLike[str], *, patch: int = 6, seed: int = 0) -> str:
    """A tiny random Qwen2.5-VL or Qwen3-VL checkpoint (vision width 32, 4 blocks; text width 32, 2 layers)
    with the families' special tokens, chat template and processor configs."""
    if family not in TINY_QWEN:
        raise ValueError(f"unknown Qwen family {family!r}; valid: {', '.join(QWEN_FAMILIES)}")
    make_config, template, video_kind = TINY_QWEN[family]
    torch.manual_seed(seed)
    tok = make_qwen_tokenizer(template)
    ids: Json = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    factor = patch * 2
    text: Json = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = getattr(tf, FAMILY_MODULES[family].class_name)(make_config(patch, text, ids))
    # 16..256 merged tokens per frame
    pixels = {"min_pixels": factor * factor * 16, "max_pixels": factor * factor * 256}
    common = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
              "do_convert_rgb": True, "patch_size": patch, "temporal_patch_size": 2, "merge_size": 2,
              "size": {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]}, **pixels}
    image_proc = {"image_processor_type": "Qwen2VLImageProcessor", **common}
    video_proc = {"video_processor_type": video_kind, **common, "fps": 2.0}
    return save_checkpoint(folder, model, tok, image_proc, video_proc, chat_template=template)


def _major() -> int:
    return int(tf.__version__.split(".")[0])


def build_tiny_tower(folder: str | os.PathLike[str], *, layers: int = 3, seed: int = 0) -> str:
    """A tiny bare CLIP vision tower folder (config.json + safetensors + preprocessor_config.json), the kind
    Load Vision Tower / :func:`comfy_visionzip.vlm.load_tower` reads; returns the folder."""
    torch.manual_seed(seed)
    folder = os.fspath(folder)
    tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                           num_attention_heads=4, image_size=48, patch_size=6)).save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"size": {"shortest_edge": 48}, "crop_size": {"height": 48, "width": 48}, "do_center_crop": True}, f)
    return folder
