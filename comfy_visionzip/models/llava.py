"""LLaVA-1.5 (``LlavaForConditionalGeneration``): the defaults of :class:`FamilyModule`."""

from .base import FamilyModule


class Llava(FamilyModule):
    model_type = "llava"
    class_name = "LlavaForConditionalGeneration"
    display = "LLaVA-1.5"
