"""ComfyUI nodes (V1 classes). Plain classes: they load in every ComfyUI and are testable without it.

Imports of the library are relative: ComfyUI does not put custom-node folders on ``sys.path``.
"""

from .video import NODE_CLASS_MAPPINGS as _VIDEO
from .video import NODE_DISPLAY_NAME_MAPPINGS as _VIDEO_NAMES

NODE_CLASS_MAPPINGS = {**_VIDEO}
NODE_DISPLAY_NAME_MAPPINGS = {**_VIDEO_NAMES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
