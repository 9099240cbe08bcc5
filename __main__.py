"""The command line run by the pack's folder: ``python custom_nodes/ComfyUI-VisionZip fetch-weights`` from
ComfyUI's folder, with ComfyUI's Python (the portable build's ``python_embeded\\python.exe`` too), the same
as ``python -m comfy_visionzip fetch-weights`` inside the pack's folder.

``python -m comfy_visionzip`` needs ``comfy_visionzip`` importable: true inside this folder or after
``pip install -e .``, not from ComfyUI's folder (nor ever with the portable build's Python, which does not
put the current folder on ``sys.path``). Run as a folder, this file puts the folder on ``sys.path`` itself.
ComfyUI never runs it (it imports ``__init__.py``).
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from comfy_visionzip.__main__ import main

    folder = os.path.relpath(os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main(prog=f"python {folder}"))
