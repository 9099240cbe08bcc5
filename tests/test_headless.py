"""The headless runner against hostile workflow files: one line on stderr, exit code 2, and no node runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runner():
    spec = importlib.util.spec_from_file_location("run_headless_under_test", REPO / "workflows" / "run_headless.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ran(runner, monkeypatch):
    """Every node the runner runs, as (class_type, inputs); each pack node returns Nones, core nodes nothing."""
    calls: list = []
    for class_type, cls in runner.load_pack().items():
        def fake(self, _name=class_type, _outputs=cls.RETURN_TYPES, **inputs):
            calls.append((_name, inputs))
            return tuple(None for _ in _outputs)
        monkeypatch.setattr(cls, cls.FUNCTION, fake)
    monkeypatch.setattr(runner, "_core", lambda class_type, node_id, inputs, out, log: calls.append(
        (class_type, inputs)) or (None, None))
    return calls


def node(runner, class_type: str, **inputs) -> dict:
    """A node of ``class_type`` with every required widget at its default, then ``inputs``."""
    spec = runner.load_pack()[class_type].INPUT_TYPES()
    values = {}
    for name, (kind, *rest) in spec["required"].items():
        options = rest[0] if rest else {}
        if "default" in options:
            values[name] = options["default"]
        elif isinstance(kind, list):
            values[name] = kind[0] if kind else ""
    return {"class_type": class_type, "inputs": {**values, **inputs}}


def graph(runner) -> dict:
    """A small valid graph: a model and a tokens file, an answer, a follow-up."""
    return {
        "1": node(runner, "VisionZipLoadVLM"),
        "2": node(runner, "VisionZipLoadTokens"),
        "3": node(runner, "VisionZipAnswer", model=["1", 0], tokens=["2", 0]),
        "4": node(runner, "VisionZipChat", chat=["3", 1]),
    }


def refused(runner, ran, capsys, tmp_path, workflow, *argv: str) -> str:
    """Run ``workflow`` (text, or data written as JSON); assert the one-line refusal and that nothing ran."""
    path = tmp_path / "hostile_api.json"
    if isinstance(workflow, bytes):
        path.write_bytes(workflow)
    else:
        path.write_text(workflow if isinstance(workflow, str) else json.dumps(workflow))
    out = tmp_path / "out"
    assert runner.main([str(path), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert not ran and not out.exists()
    return err


def test_the_small_graph_runs(runner, ran, tmp_path):
    """The graph the hostile cases start from is valid: it runs, model first."""
    runner.run(graph(runner), out=tmp_path, log=lambda _line: None)
    assert [name for name, _inputs in ran] == ["VisionZipLoadVLM", "VisionZipLoadTokens", "VisionZipAnswer",
                                               "VisionZipChat"]


@pytest.mark.parametrize("text,message", [
    ("{not json", "not a JSON workflow"),
    ("", "not a JSON workflow"),
    ("[1, 2]", "the workflow is a list, not an API-format graph"),
    ('"text"', "the workflow is text, not an API-format graph"),
    ("null", "not an API-format graph"),
    ("{}", "not an API-format graph"),
    ("[" * 100000, "nested too deeply"),
    ('{"1": {"class_type": "VisionZipLoadVLM", "inputs": {"path": ' + "[" * 500 + "]" * 500 + "}}}",
     "nests more than 16 levels"),
    ('{"1": {"class_type": "VisionZipLoadVLM", "inputs": {}}, "1": {"class_type": "VisionZipChat", "inputs": {}}}',
     "node id '1' appears more than once"),
    ('{"1": {"class_type": "VisionZipLoadVLM", "inputs": {"dtype": "fp16", "dtype": "bf16"}}}',
     "node 1: input 'dtype' is given more than once"),
    ('{"1": {"class_type": "VisionZipLoadVLM", "class_type": "VisionZipChat", "inputs": {}}}',
     "node 1: 'class_type' is given more than once"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_files_that_are_not_workflows(text, message, runner, ran, capsys, tmp_path):
    assert message in refused(runner, ran, capsys, tmp_path, text)


def test_paths_that_are_not_workflow_files(runner, ran, capsys, tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(runner.MAX_BYTES + 1)
    for path, message in [(tmp_path, "not a file"), (tmp_path / "missing.json", "no such workflow file"),
                          (big, "too big for a workflow")]:
        assert runner.main([str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not ran


@pytest.mark.parametrize("change,message", [
    (lambda g: g.update({"4": [1, 2]}), "node 4: is a list, not a node"),
    (lambda g: g.update({"4": "VisionZipChat"}), "node 4: is text, not a node"),
    (lambda g: g["4"].pop("class_type"), "node 4: has no class_type"),
    (lambda g: g["4"].update(class_type=["VisionZipChat"]), "node 4: class_type is a list"),
    (lambda g: g["4"].update(class_type={"a": 1}), "node 4: class_type is an object"),
    (lambda g: g["4"].update(class_type="VisionZipChatt"), "node 4 (VisionZipChatt): unknown node type; did you mean "
                                                           "'VisionZipChat'? this runner knows VisionZip{LoadVideo"),
    (lambda g: g["4"].update(class_type="KSampler"), "node 4 (KSampler): unknown node type"),
    (lambda g: g["4"].update(inputs=[["3", 1]]), "node 4 (VisionZipChat): inputs is a list, not an object"),
    (lambda g: g["4"]["inputs"].update(chat=["9", 1]), "node 4 (VisionZipChat): input 'chat' links to node 9, "
                                                        "which does not exist"),
    (lambda g: g["4"]["inputs"].update(chat=[3, 2]), "input 'chat' links to output 2 of node 3 (VisionZipAnswer), "
                                                     "which has 2 outputs"),
    (lambda g: g["4"]["inputs"].update(chat=["3", -1]), "links to output -1 of node 3"),
    (lambda g: g["4"]["inputs"].update(chat=["3", 0]), "input 'chat' needs VISIONZIP_CHAT, but node 3 "
                                                       "(VisionZipAnswer) output 0 is STRING"),
    (lambda g: g["4"]["inputs"].update(chat=["3"]), "node 4 (VisionZipChat): input 'chat': needs a link from a node's "
                                                    "VISIONZIP_CHAT output, got the value ['3'] (a link is"),
    (lambda g: g["4"]["inputs"].update(chat=["3", True]), "input 'chat': needs a link"),
    (lambda g: g["4"]["inputs"].pop("question"), "node 4 (VisionZipChat): required input 'question' is missing"),
    (lambda g: g["4"].update(inputs={"chat": ["3", 1]}),
     "node 4 (VisionZipChat): required inputs 'question', 'max_new_tokens', 'temperature', 'top_p', 'seed' are missing"
     ),
    (lambda g: g["4"].pop("inputs"), "node 4 (VisionZipChat): required inputs 'chat', 'question'"),
    (lambda g: g["4"]["inputs"].update(colour="red"), "node 4 (VisionZipChat): has no input 'colour'"),
])
def test_graphs_that_are_broken(change, message, runner, ran, capsys, tmp_path):
    workflow = graph(runner)
    change(workflow)
    assert message in refused(runner, ran, capsys, tmp_path, workflow)


@pytest.mark.parametrize("change,message", [
    (lambda g: g["1"]["inputs"].update(dtype="fp8"), "node 1 (VisionZipLoadVLM): input 'dtype': 'fp8' is not one of"),
    (lambda g: g["1"]["inputs"].update(dtype=["fp16", "bf16", "x"]), "input 'dtype': ['fp16', 'bf16', 'x'] is not one"),
    (lambda g: g["1"]["inputs"].update(dtype={"fp16": 1}), "input 'dtype': {'fp16': 1} is not one of"),
    (lambda g: g["1"]["inputs"].update(model=5), "node 1 (VisionZipLoadVLM): input 'model': 5 is not text"),
    (lambda g: g["1"]["inputs"].update(keep_loaded="yes"), "input 'keep_loaded': 'yes' is not true or false"),
    (lambda g: g["1"]["inputs"].update(keep_loaded=1), "input 'keep_loaded': 1 is not true or false"),
    (lambda g: g["1"]["inputs"].update(path=3), "node 1 (VisionZipLoadVLM): input 'path': 3 is not text"),
    (lambda g: g["3"]["inputs"].update(question=None), "node 3 (VisionZipAnswer): input 'question': None is not text"),
    (lambda g: g["3"]["inputs"].update(max_new_tokens="ten"), "input 'max_new_tokens': 'ten' is not an integer"),
    (lambda g: g["3"]["inputs"].update(max_new_tokens=2.5), "input 'max_new_tokens': 2.5 is not an integer"),
    (lambda g: g["3"]["inputs"].update(max_new_tokens=True), "input 'max_new_tokens': True is not an integer"),
    (lambda g: g["3"]["inputs"].update(max_new_tokens=0), "input 'max_new_tokens': 0 is below the minimum 1"),
    (lambda g: g["3"]["inputs"].update(seed=99999999999999999999), "input 'seed': 99999999999999999999 is above the "
                                                                  "maximum"),
    (lambda g: g["3"]["inputs"].update(temperature="hot"), "input 'temperature': 'hot' is not a number"),
    (lambda g: g["3"]["inputs"].update(temperature=99.0), "input 'temperature': 99.0 is above the maximum"),
    (lambda g: g["3"]["inputs"].update(top_p=float("nan")), "input 'top_p': nan is not a finite number"),
    (lambda g: g["3"]["inputs"].update(top_p=float("inf")), "input 'top_p': inf is not a finite number"),
])
def test_values_of_the_wrong_kind_name_the_input_and_the_node(change, message, runner, ran, capsys, tmp_path):
    workflow = graph(runner)
    change(workflow)
    line = refused(runner, ran, capsys, tmp_path, workflow)
    assert message in line and len(line) < 1000, line


def test_a_cycle_is_found_before_anything_runs_and_names_its_nodes(runner, ran, capsys, tmp_path):
    workflow = graph(runner)
    workflow["5"] = node(runner, "VisionZipChat", chat=["4", 1])
    workflow["4"]["inputs"]["chat"] = ["5", 1]
    line = refused(runner, ran, capsys, tmp_path, workflow)
    assert "the workflow has a cycle: node 4 (VisionZipChat) takes an input from node 5 (VisionZipChat) takes an " \
           "input from node 4 (VisionZipChat)" in line, line
    workflow = graph(runner)
    workflow["4"]["inputs"]["chat"] = ["4", 1]  # a node that takes its own output
    assert "cycle: node 4 (VisionZipChat) takes an input from node 4" in refused(runner, ran, capsys, tmp_path,
                                                                                 workflow)


def test_a_long_cycle_is_named_briefly(runner, ran, capsys, tmp_path):
    workflow = graph(runner)
    for i in range(5, 5000):
        workflow[str(i)] = node(runner, "VisionZipChat", chat=[str(i + 1 if i < 4999 else 5), 1])
    line = refused(runner, ran, capsys, tmp_path, workflow)
    assert "the workflow has a cycle" in line and "more" in line and len(line) < 1000, line


def test_a_long_chain_listed_tail_first_runs_in_dependency_order(runner, ran, tmp_path):
    workflow = graph(runner)
    chain = {str(i): node(runner, "VisionZipChat", chat=[str(i - 1), 1], question=f"q{i}") for i in range(5, 3005)}
    workflow = {**dict(reversed(chain.items())), **dict(reversed(workflow.items()))}  # every node after its users
    runner.run(workflow, out=tmp_path, log=lambda _line: None)
    questions = [inputs["question"] for name, inputs in ran if name == "VisionZipChat"]
    assert [name for name, _inputs in ran[:3]] == ["VisionZipLoadVLM", "VisionZipLoadTokens", "VisionZipAnswer"]
    assert questions[1:] == [f"q{i}" for i in range(5, 3005)] and len(ran) == 3004


@pytest.mark.parametrize("workflow,argv,message", [
    (None, ["--set", "9.path=/x"], "--set 9.path: the workflow has no node 9 (nodes: 1, 2, 3, 4)"),
    (None, ["--set", "1.colour=red"],
     "--set 1.colour: node 1 (VisionZipLoadVLM) has no input 'colour' (inputs: model,"),
    (None, ["--set", "1.dtype=fp8"], "node 1 (VisionZipLoadVLM): input 'dtype': 'fp8' is not one of"),
    (None, ["--set", "3.seed=-1"], "node 3 (VisionZipAnswer): input 'seed': -1 is below the minimum 0"),
    (None, ["--set", "3.top_p=NaN"], "node 3 (VisionZipAnswer): input 'top_p': nan is not a finite number"),
    (None, ["--set", "3.temperature=warm"], "node 3 (VisionZipAnswer): input 'temperature': 'warm' is not a number"),
    (None, ["--set", "1.keep_loaded=maybe"], "input 'keep_loaded': 'maybe' is not true or false"),
    (None, ["--set", "4.chat=[\"9\", 1]"], "node 4 (VisionZipChat): input 'chat' links to node 9, which does not"),
    (None, ["--set", "1.path=" + "[" * 100 + "]" * 100], "--set 1.path: the value nests more than 16 levels"),
    (None, ["--set", "1path=/x"], "--set '1path=/x': expected NODE.INPUT=VALUE"),
    ({"1": [1, 2]}, ["--set", "1.path=/x"], "--set 1.path: node 1 is a list, not a node with inputs to set"),
    ({"1": {"class_type": "VisionZipLoadVLM", "inputs": "x"}}, ["--set", "1.path=/x"],
     "--set 1.path: node 1 has inputs that are text"),
])
def test_overrides_that_cannot_apply(workflow, argv, message, runner, ran, capsys, tmp_path):
    line = refused(runner, ran, capsys, tmp_path, workflow or graph(runner), *argv)
    assert message in line, line


def test_an_override_may_set_an_optional_input_the_workflow_left_out(runner, ran, tmp_path):
    workflow = graph(runner)
    workflow["1"]["inputs"].pop("path", None)
    runner.run(workflow, out=tmp_path, overrides={"1.path": "/models/m"}, log=lambda _line: None)
    assert ran[0] == ("VisionZipLoadVLM", {**workflow["1"]["inputs"], "path": "/models/m"})


def test_out_that_cannot_be_a_folder(runner, ran, capsys, tmp_path):
    path = tmp_path / "ok_api.json"
    path.write_text(json.dumps(graph(runner)))
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert runner.main([str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--out" in err and "is a file" in err, err
    assert not ran


def test_many_problems_are_capped(runner, ran, capsys, tmp_path):
    path = tmp_path / "many_api.json"
    path.write_text(json.dumps({str(i): {"class_type": "Nope", "inputs": {}} for i in range(100)}))
    assert runner.main([str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == runner.MAX_LINES + 1 and err[-1] == "error: ... and 80 more problems"
    assert not ran


def test_the_python_api_refuses_what_json_cannot_hold(runner, ran, tmp_path):
    workflow = graph(runner)
    workflow["3"]["inputs"]["question"] = workflow  # a graph that holds itself
    with pytest.raises(runner.WorkflowError, match="nests more than 16 levels"):
        runner.run(workflow, out=tmp_path)
    workflow["3"]["inputs"]["question"] = object()
    with pytest.raises(runner.WorkflowError, match="not JSON data"):
        runner.run(workflow, out=tmp_path)
    assert not ran


def test_the_body_of_a_prompt_request_is_read_as_its_graph(runner, tmp_path):
    path = tmp_path / "body.json"
    path.write_text(json.dumps({"prompt": {"1": {"class_type": "VisionZipLoadVLM", "inputs": {}}}, "client_id": "x"}))
    assert runner.read_workflow(path) == {"1": {"class_type": "VisionZipLoadVLM", "inputs": {}}}
