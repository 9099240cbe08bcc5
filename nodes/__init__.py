"""ComfyUI nodes (V1 classes). Plain classes: they load in every ComfyUI and are testable without it.

Imports of the library are relative: ComfyUI does not put custom-node folders on ``sys.path``.
"""

from . import answer, encode, model, video

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (video, model, encode, answer):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
