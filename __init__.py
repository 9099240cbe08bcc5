"""ComfyUI-VisionZip: ComfyUI entry point.

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS.
Importing it has no side effects (no downloads, no probing, nothing registered with the server), and
it imports cleanly without ComfyUI. The library itself lives in ``comfy_visionzip`` and never imports
ComfyUI.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"  # a small front-end extension that shows answers on the nodes

if __package__:  # imported as a package (ComfyUI, tests); a bare ``import __init__`` gets empty mappings
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
