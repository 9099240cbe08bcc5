"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a ViT with window attention in most blocks and
full attention in a few, a 2x2 patch merger into the language model's width, two frames per temporal
patch, and absolute-time temporal positions (``tokens_per_second`` x seconds between temporal patches).

Scores come from the last block (a full-attention block in the released checkpoints; otherwise the last
full-attention block); the window order of the blocks is undone before selecting. See
:mod:`comfy_visionzip.models._qwen` for the semantics and where they differ from the authors' release.
"""

from ._qwen import QwenFamily


class Qwen2_5_VL(QwenFamily):
    model_type = "qwen2_5_vl"
    class_name = "Qwen2_5_VLForConditionalGeneration"
    display = "Qwen2.5-VL"
    window = True
