"""Tiny random-weight LLaVA-family checkpoints, saved the way real ones are, for the demo and tests.

Nothing is downloaded: the configs are built here (vision hidden 32, two layers; text hidden 32, two
layers), the tokenizer is a word-level vocabulary made from scratch, and the folder gets the same
files a Hugging Face checkpoint has (config.json, model.safetensors, tokenizer files, the image and
video processor configs, a chat template). Loading it goes through the real loader
(:func:`comfy_visionzip.vlm.load_vlm`).
"""

from __future__ import annotations

import json
import os

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


def make_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="left", model_input_names=["input_ids", "attention_mask"], chat_template=CHAT_TEMPLATE,
    )


def _clip(image_size: int, patch: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=image_size, patch_size=patch, projection_dim=32)


def _siglip(image_size: int, patch: int):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=patch, vision_use_head=False)


def _clip_processor(size: int, pinpoints=None, kind: str = "CLIPImageProcessor") -> dict:
    config = {
        "image_processor_type": kind, "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
    }
    if pinpoints:
        config.update(image_grid_pinpoints=pinpoints, do_pad=True)
    return config


def build_tiny(family: str, folder: str | os.PathLike[str], *, image_size: int = 48, patch: int = 6, seed: int = 0) -> str:
    """Create and save a tiny random checkpoint of ``family`` in ``folder``; returns the folder."""
    import torch
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    folder = os.fspath(folder)
    tok = make_tokenizer()
    text = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    image_id, video_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<video>")
    common = dict(text_config=text, image_token_index=image_id, projector_hidden_act="gelu")
    n = image_size
    pinpoints = [[n, 2 * n], [2 * n, n], [2 * n, 2 * n]]
    image_proc, video_proc = None, None
    if family == "llava":
        config = tf.LlavaConfig(vision_config=_clip(n, patch), vision_feature_layer=-2,
                                vision_feature_select_strategy="default", **common)
        model = tf.LlavaForConditionalGeneration(config)
        image_proc = _clip_processor(n)
    elif family == "llava_next":
        config = tf.LlavaNextConfig(vision_config=_clip(n, patch), vision_feature_layer=-2,
                                    vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints, **common)
        model = tf.LlavaNextForConditionalGeneration(config)
        image_proc = _clip_processor(n, pinpoints, "LlavaNextImageProcessor")
    elif family == "llava_next_video":
        config = tf.LlavaNextVideoConfig(vision_config=_clip(n, patch), vision_feature_layer=-2,
                                         vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
                                         video_token_index=video_id, spatial_pool_mode="average",
                                         spatial_pool_stride=2, **common)
        model = tf.LlavaNextVideoForConditionalGeneration(config)
        image_proc = _clip_processor(n, pinpoints, "LlavaNextImageProcessor")
        video_proc = {**_clip_processor(n), "video_processor_type": "LlavaNextVideoVideoProcessor"}
        video_proc.pop("image_processor_type")
    elif family == "video_llava":
        config = tf.VideoLlavaConfig(vision_config=_clip(n, patch), vision_feature_layer=-2,
                                     vision_feature_select_strategy="default", video_token_index=video_id, **common)
        model = tf.VideoLlavaForConditionalGeneration(config)
        image_proc = _clip_processor(n, kind="VideoLlavaImageProcessor")
        video_proc = {**image_proc, "video_processor_type": "VideoLlavaVideoProcessor"}
        video_proc.pop("image_processor_type")
    else:  # llava_onevision
        config = tf.LlavaOnevisionConfig(vision_config=_siglip(n, patch), vision_feature_layer=-1,
                                         vision_feature_select_strategy="full", video_token_index=video_id,
                                         image_grid_pinpoints=[[n * a, n * b] for a in (1, 2) for b in (1, 2)],
                                         vision_aspect_ratio="anyres_max_9", **common)
        model = tf.LlavaOnevisionForConditionalGeneration(config)
        square = {"height": n, "width": n}
        image_proc = {"image_processor_type": "LlavaOnevisionImageProcessor", "do_resize": True, "size": square,
                      "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                      "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
                      "do_pad": True, "image_grid_pinpoints": config.image_grid_pinpoints}
        video_proc = {"video_processor_type": "LlavaOnevisionVideoProcessor", "do_resize": True, "size": square,
                      "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                      "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}
    return save_checkpoint(folder, model, tok, image_proc, video_proc)


def save_checkpoint(folder: str | os.PathLike[str], model, tokenizer, image_processor: dict,
                    video_processor: dict | None = None, chat_template: str = CHAT_TEMPLATE) -> str:
    """Write a model folder the way a Hugging Face checkpoint is laid out (weights, tokenizer, processor
    configs, chat template), so it is loaded with the real loading code; returns the folder."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(image_processor, f, indent=2)
    if video_processor is not None:
        with open(os.path.join(folder, "video_preprocessor_config.json"), "w") as f:
            json.dump(video_processor, f, indent=2)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(chat_template)
    return folder
