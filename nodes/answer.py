"""Answer / Chat / Save Tokens / Load Tokens nodes."""

from __future__ import annotations

import os

from ..comfy_visionzip.answer import Chat, GenerationConfig
from ..comfy_visionzip.budget import POLICIES
from ..comfy_visionzip.store import load_tokens, save_tokens
from . import _comfy
from .encode import TOKENS_TYPE
from .model import MODEL_TYPE

CHAT_TYPE = "VISIONZIP_CHAT"

GENERATION = {
    "max_new_tokens": ("INT", {"default": 256, "min": 1, "max": 8192, "tooltip": "Longest answer, in tokens."}),
    "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 5.0, "step": 0.05,
                              "tooltip": "0 = greedy (the same answer every time); higher = more varied."}),
    "top_p": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                        "tooltip": "Sample only from the most likely tokens that together reach this probability."}),
    "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                     "tooltip": "Random seed for sampling (temperature > 0)."}),
}


def _config(max_new_tokens, temperature, top_p, seed, stop="") -> GenerationConfig:
    stops = tuple(s for s in (stop or "").split("|") if s)
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stops)


class ChatState:
    """A conversation plus the model handle it asks through. Between turns (in ComfyUI's cache of node outputs) the
    conversation is parked: it holds no model (unloading the model frees it) and its KV cache waits on the CPU (no
    VRAM held after the run); a follow-up brings both back, and the cache is reused."""

    def __init__(self, handle, chat: Chat) -> None:
        self.handle = handle
        self.chat = chat

    def ask(self, question: str, config: GenerationConfig, node_id: str | None = None) -> ChatState:
        branch = ChatState(self.handle, self.chat.fork())  # ComfyUI may reuse this state: never mutate it
        with self.handle as vlm:
            if branch.chat.parked:
                branch.chat.resume(vlm)
            try:
                branch.chat.ask(question, config, on_text=_comfy.text_streamer(node_id),
                                progress=_comfy.progress_callback(config.max_new_tokens))
            finally:
                branch.chat.park()
        return branch

    def transcript(self) -> str:
        return "\n\n".join(f"Q: {t.question}\nA: {t.answer}" for t in self.chat.turns)


def _result(state: ChatState):
    turn = state.chat.turns[-1]
    notes = [state.chat.note] if state.chat.note and len(state.chat.turns) == 1 else []
    notes += [state.chat.adapter_note] if getattr(state.chat, "adapter_note", "") else []  # parked chats of older runs
    note = "".join(f"; {n}" for n in notes)
    # the numbers first: a long answer would push them out of the node's text box
    info = (f"[{state.chat.video.total_tokens} visual tokens; prefilled {turn.prefill_tokens} new tokens, "
            f"reused {turn.cached_tokens} from the cache; {turn.new_tokens} generated; "
            f"context {state.chat.context}{note}]"
            f"\n\n{turn.answer}")
    return {"ui": {"text": [info]}, "result": (turn.answer, state)}


class VisionZipAnswer:
    DESCRIPTION = "Asks the model a question about the compressed video; keeps the KV cache for follow-ups (Chat)."
    CATEGORY = "VisionZip/answer"
    FUNCTION = "answer"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", CHAT_TYPE)
    RETURN_NAMES = ("answer", "chat")
    OUTPUT_TOOLTIPS = ("The answer text.", "The conversation so far, for follow-up questions with Chat.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load VLM (the same model that made the tokens)."}),
                "tokens": (TOKENS_TYPE, {"tooltip": "From Video to Tokens, VisionZip Compress or Load Tokens."}),
                "question": ("STRING", {"default": "What happens in this video?", "multiline": True,
                                        "tooltip": "Your question about the video."}),
                **GENERATION,
                "timestamps": ("BOOLEAN", {"default": True, "tooltip": "Tell the model when each frame was taken."}),
            },
            "optional": {
                "stop": ("STRING", {"default": "", "tooltip": "Stop strings, separated by |."}),
                "system": ("STRING", {"default": "", "multiline": True, "tooltip": "An optional system message."}),
                "policy": (list(POLICIES), {"default": "fit",
                                            "tooltip": ("If the video, question and answer do not fit the model's "
                                                        "context: fit drops frames evenly (and says so); strict stops "
                                                        "with the numbers.")}),
                "follow_up_reserve": ("INT", {"default": 256, "min": 0, "max": 1 << 20,
                                              "tooltip": ("Tokens of the context kept free for follow-up questions "
                                                          "(Chat nodes): the first answer never fills the context past "
                                                          "this.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def answer(self, model, tokens, question, max_new_tokens, temperature, top_p, seed, timestamps, stop="", system="",
               policy="fit", follow_up_reserve=256, unique_id=None):
        config = _config(max_new_tokens, temperature, top_p, seed, stop)
        with model as vlm:  # one use of the model for the whole node
            chat = Chat(vlm, tokens, timestamps=timestamps, system=system or None, policy=policy,
                        reserve=follow_up_reserve)
            return _result(ChatState(model, chat).ask(question, config, unique_id))


class VisionZipChat:
    DESCRIPTION = ("A follow-up question in the same conversation: reuses the KV cache, so the video is neither "
                   "encoded nor prefilled again.")
    CATEGORY = "VisionZip/answer"
    FUNCTION = "chat"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", CHAT_TYPE)
    RETURN_NAMES = ("answer", "chat")
    OUTPUT_TOOLTIPS = ("The answer text.", "The conversation including this turn.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "chat": (CHAT_TYPE, {"tooltip": "From Answer or another Chat node."}),
                "question": ("STRING", {"default": "And then?", "multiline": True,
                                        "tooltip": "The follow-up question."}),
                **GENERATION,
            },
            "optional": {"stop": ("STRING", {"default": "", "tooltip": "Stop strings, separated by |."})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def chat(self, chat, question, max_new_tokens, temperature, top_p, seed, stop="", unique_id=None):
        return _result(chat.ask(question, _config(max_new_tokens, temperature, top_p, seed, stop), unique_id))


class VisionZipSaveTokens:
    DESCRIPTION = ("Saves compressed tokens (with timestamps, settings and model) to a .safetensors file: encode once, "
                   "ask later.")
    CATEGORY = "VisionZip/answer"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the file was written.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tokens": (TOKENS_TYPE, {"tooltip": "Compressed tokens to keep."}),
            "filename_prefix": ("STRING", {"default": "visionzip/tokens",
                                           "tooltip": ("Relative to ComfyUI's output folder (a number is added); it "
                                                       "may not leave that folder.")}),
        }}

    def save(self, tokens, filename_prefix):
        path = save_tokens(tokens, _comfy.output_path(filename_prefix, ".safetensors"))
        return {"ui": {"text": [path]}, "result": (path,)}


class VisionZipLoadTokens:
    DESCRIPTION = "Loads tokens saved by Save Tokens; with a model connected, checks they were made with it."
    CATEGORY = "VisionZip/answer"
    FUNCTION = "load"
    RETURN_TYPES = (TOKENS_TYPE, "STRING")
    RETURN_NAMES = ("tokens", "summary")
    OUTPUT_TOOLTIPS = ("The saved tokens.", "What they hold.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "path": ("STRING", {"default": "",
                                    "tooltip": ("A .safetensors file from Save Tokens inside ComfyUI's output or "
                                                "input folder (a relative path is looked for in the output "
                                                "folder, then in the input folder). Empty: the file picked below.")}),
            },
            "optional": {
                "model": (MODEL_TYPE, {"tooltip": "Check that the tokens were made with this model."}),
                "file": (["", *_comfy.list_tokens_files()], {
                    "tooltip": ("Tokens files found in ComfyUI's output folder (newest first); used when 'path' is "
                                "empty.")}),
            },
        }

    @staticmethod
    def _chosen(path: str, file: str = "") -> str:
        return (path or "").strip() or (file or "")

    @classmethod
    def IS_CHANGED(cls, path, file="", **_kwargs):
        chosen = cls._chosen(path, file)
        if not chosen:
            return ""  # nothing chosen: load() says so
        try:
            full = _comfy.tokens_file(chosen)
        except ValueError:
            return chosen  # refused by load(); nothing outside the folders is looked at
        return f"{full}:{os.path.getmtime(full)}" if os.path.isfile(full) else full

    def load(self, path, model=None, file=""):
        chosen = self._chosen(path, file)
        if not chosen:
            raise ValueError("no tokens file given: type a path, or pick a file Save Tokens wrote")
        tokens = load_tokens(_comfy.tokens_file(chosen), model=model.vlm if model is not None else None)
        return (tokens, tokens.summary(file_name_only=True))


NODE_CLASS_MAPPINGS = {
    "VisionZipAnswer": VisionZipAnswer,
    "VisionZipChat": VisionZipChat,
    "VisionZipSaveTokens": VisionZipSaveTokens,
    "VisionZipLoadTokens": VisionZipLoadTokens,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VisionZipAnswer": "Answer (VisionZip)",
    "VisionZipChat": "Chat (VisionZip)",
    "VisionZipSaveTokens": "Save Tokens (VisionZip)",
    "VisionZipLoadTokens": "Load Tokens (VisionZip)",
}
