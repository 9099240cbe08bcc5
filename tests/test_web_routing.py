"""Streamed answer text reaches only the browser that queued the prompt, tagged with that prompt's id.

ComfyUI is replaced by two stand-in modules: ``server`` (PromptServer.instance with the client id ComfyUI sets for
the prompt it executes) and ``comfy_execution.utils`` (the executing context that names the prompt)."""

from __future__ import annotations

import sys
import types
from typing import NamedTuple

import pytest


class _Context(NamedTuple):  # comfy_execution.utils.ExecutionContext
    prompt_id: str
    node_id: str
    list_index: int | None


class _Server:
    def __init__(self, client_id):
        self.client_id = client_id
        self.sent: list[tuple[str, dict, str | None]] = []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


@pytest.fixture
def comfy(pack, monkeypatch):
    """-> (the pack's _comfy module, install(client_id, prompt_id)) with ComfyUI's server faked."""

    def install(client_id, prompt_id="prompt-1", *, executing_context=True):
        server = _Server(client_id)
        monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(
            instance=server)))
        if executing_context:
            utils = types.SimpleNamespace(get_executing_context=lambda: _Context(prompt_id, "4", None))
            monkeypatch.setitem(sys.modules, "comfy_execution", types.SimpleNamespace(utils=utils))
            monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
        else:  # a ComfyUI from before the executing context
            monkeypatch.setitem(sys.modules, "comfy_execution.utils", None)
        return server

    return sys.modules[pack.__name__ + ".nodes._comfy"], install


def test_text_goes_to_the_queuing_client_with_the_prompt_id(comfy):
    module, install = comfy
    server = install("client-A", "prompt-1")
    on_text = module.text_streamer("4", every=0.0)
    for piece in ("Hel", "lo", "!"):
        on_text(piece)
    assert server.sent == [("visionzip.text", {"node": "4", "prompt_id": "prompt-1", "text": text}, "client-A")
                           for text in ("Hel", "Hello", "Hello!")]


def test_the_prompt_and_client_are_those_of_the_run_that_made_the_streamer(comfy):
    module, install = comfy
    server = install("client-A", "prompt-1")
    on_text = module.text_streamer("4", every=0.0)
    server.client_id = "client-B"  # ComfyUI moved on to another browser's prompt
    sys.modules["comfy_execution.utils"].get_executing_context = lambda: _Context("prompt-2", "9", None)
    on_text("late")
    assert server.sent == [("visionzip.text", {"node": "4", "prompt_id": "prompt-1", "text": "late"}, "client-A")]


def test_nothing_is_broadcast_when_no_browser_queued_the_prompt(comfy):
    module, install = comfy
    server = install(None)  # queued through the API without a client id: ComfyUI shows it to nobody either
    assert module.text_streamer("4") is None
    assert server.sent == []


def test_an_older_comfyui_without_an_executing_context_still_routes_to_the_client(comfy):
    module, install = comfy
    server = install("client-A", executing_context=False)
    module.text_streamer("4", every=0.0)("x")
    assert server.sent == [("visionzip.text", {"node": "4", "prompt_id": None, "text": "x"}, "client-A")]


def test_at_most_one_message_per_interval(comfy):
    module, install = comfy
    server = install("client-A")
    on_text = module.text_streamer("4", every=3600.0)
    for piece in "abc":
        on_text(piece)
    assert [data["text"] for _e, data, _sid in server.sent] == ["a"]  # the whole answer arrives with "executed"


def test_answer_node_streams_only_to_its_client(pack, comfy, tiny_model_dir, clip_factory):
    _module, install = comfy
    server = install("client-A", "prompt-7")
    nodes = pack.NODE_CLASS_MAPPINGS
    model = nodes["VisionZipLoadVLM"]().load(model="", dtype="fp32", device="cpu", quantization="none",
                                              attention="sdpa", keep_loaded=False,
                                              path=tiny_model_dir("llava"))[0]
    video = nodes["VisionZipLoadVideo"]().load(video="", mode="num_frames", num_frames=4, fps=1.0, every=1,
                                               start=0.0, end=0.0, max_frames=0, max_size=0, preview_frames=2,
                                               backend="auto", path=clip_factory("route.mp4", frames=20))[2]
    tokens = nodes["VisionZipVideoToTokens"]().run(model=model, video=video, method="visionzip", dominant=8,
                                                   contextual=2, tokens_per_frame=0, batch_size=4)["result"][0]
    nodes["VisionZipAnswer"]().answer(model=model, tokens=tokens, question="What happens?", max_new_tokens=4,
                                      temperature=0.0, top_p=1.0, seed=0, timestamps=True, unique_id="12")
    streamed = [(event, data["node"], data["prompt_id"], sid) for event, data, sid in server.sent]
    assert streamed and set(streamed) == {("visionzip.text", "12", "prompt-7", "client-A")}
