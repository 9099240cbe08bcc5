// Shows the text a VisionZip node returns (answers, summaries) on the node itself, and the answer while it is
// being generated (the "visionzip.text" messages Answer and Chat send to the browser that queued the prompt).
//
// What is shown is display only: it never enters the prompt (a changed input would make every Run re-execute
// the node) nor the saved workflow. Streamed text is written only for prompts this browser tab queued, and only
// while the workflow they were queued from is the one open: another workflow's nodes with the same ids, or
// another user's browser, never see it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WIDGET = "visionzip_output";
const CURSOR = " \u258c"; // after streamed text while the answer is still being written
const REMEMBERED = 200; // prompt ids kept; older ones (queued but never run) are forgotten

// prompt id -> { workflow: the workflow it was queued from, cursors: nodes showing a streaming cursor }
const prompts = new Map();
let running = null; // this tab's prompt that is executing now (ComfyUI runs one prompt at a time)

function openWorkflow() {
  // the frontend keeps one graph object and reloads it per workflow, so the workflow is what tells them apart
  return app.extensionManager?.workflow?.activeWorkflow ?? app.graph;
}

function remember(promptId, workflow) {
  const known = prompts.get(promptId);
  prompts.set(promptId, { workflow, cursors: known?.cursors ?? new Set() });
  while (prompts.size > REMEMBERED) prompts.delete(prompts.keys().next().value);
}

function ranHere(promptId) {
  const prompt = prompts.get(promptId);
  return !!prompt && prompt.workflow === openWorkflow();
}

function findNode(graph, executionId) {
  // "7", or "12:7" for node 7 inside subgraph node 12
  let node = null;
  for (const part of String(executionId ?? "").split(":")) {
    const id = Number(part);
    node = graph?.getNodeById(Number.isNaN(id) ? part : id) ?? null;
    graph = node?.subgraph;
  }
  return node;
}

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets["STRING"](node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.85;
    widget.serialize = false; // not saved into the workflow
    (widget.options ??= {}).serialize = false; // not sent with the prompt (graphToPrompt reads this one)
  }
  widget.value = text;
  node.onResize?.(node.size);
  app.graph.setDirtyCanvas(true, false);
}

function settle(promptId) {
  // the prompt ended (done, cancelled or failed): no node of it is still being written
  const prompt = prompts.get(promptId);
  for (const node of prompt?.cursors ?? []) {
    const widget = node.widgets?.find((w) => w.name === WIDGET);
    if (typeof widget?.value === "string" && widget.value.endsWith(CURSOR)) {
      widget.value = widget.value.slice(0, -CURSOR.length);
    }
  }
  prompts.delete(promptId);
  if (running === promptId) running = null;
  app.graph?.setDirtyCanvas(true, false);
}

app.registerExtension({
  name: "VisionZip.ShowText",
  setup() {
    // which workflow a prompt was queued from: known only when it is queued (the user may switch before it runs)
    const queuePrompt = api.queuePrompt;
    api.queuePrompt = async function (...args) {
      const workflow = openWorkflow();
      const result = await queuePrompt.apply(this, args);
      if (result?.prompt_id) remember(result.prompt_id, workflow);
      return result;
    };
    // ComfyUI sends "execution_start" only to the browser that queued the prompt
    api.addEventListener("execution_start", ({ detail }) => {
      running = detail?.prompt_id ?? null;
      if (running && !prompts.has(running)) remember(running, openWorkflow()); // queued before its reply came
    });
    for (const end of ["execution_success", "execution_interrupted", "execution_error"]) {
      api.addEventListener(end, ({ detail }) => settle(detail?.prompt_id ?? running));
    }
    api.addEventListener("visionzip.text", ({ detail }) => {
      const promptId = detail?.prompt_id ?? running;
      if (typeof detail?.text !== "string" || !ranHere(promptId)) return;
      const node = findNode(app.graph, detail.node);
      if (!node?.type?.startsWith("VisionZip")) return;
      showText(node, detail.text + CURSOR);
      prompts.get(promptId).cursors.add(node);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("VisionZip")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      // the frontend hands results to the open graph's node of that id, whichever workflow ran them
      if (!ranHere(running)) return;
      const text = message?.text;
      if (!text || !text.length) return;
      showText(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});
