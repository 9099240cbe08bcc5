// Shows the text a VisionZip node returns (answers, summaries) on the node itself, and the answer while it is
// being generated (the "visionzip.text" messages Answer and Chat send to the browser that queued the prompt).
// A summary is shown whole: the box wraps long words (paths) and the node grows to hold the text.
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
const SCROLLED = new Set(["VisionZipAnswer", "VisionZipChat"]); // answers: a fixed box that scrolls, numbers first
const MOST_GROWN = 320; // the tallest a summary box grows to (px), so a node never runs far over its neighbours

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

function textHeight(node, inputEl) {
  // the height the whole text needs in the box, measured on a hidden copy of it (the box itself is not laid out
  // while the canvas is zoomed far out)
  const style = getComputedStyle(inputEl);
  const probe = document.createElement("textarea");
  probe.style.cssText = "position:absolute; left:-10000px; top:0; visibility:hidden; height:0; overflow:hidden;";
  Object.assign(probe.style, {
    width: `${inputEl.clientWidth || node.size[0] - 20}px`, // DOM widgets: the node's width less a 10 px margin
    boxSizing: style.boxSizing, padding: style.padding, border: style.border, font: style.font,
    lineHeight: style.lineHeight, letterSpacing: style.letterSpacing, whiteSpace: "pre-wrap", overflowWrap: "anywhere",
  });
  probe.value = inputEl.value;
  document.body.append(probe);
  const needed = probe.scrollHeight;
  probe.remove();
  return needed;
}

function fitText(node, widget) {
  // grow the node (never shrink it) until the summary box holds its whole text
  const needed = Math.min(textHeight(node, widget.inputEl), MOST_GROWN);
  if (!needed) return;
  widget.options.getMinHeight = () => needed + 4;
  const size = node.computeSize();
  if (size[1] > node.size[1]) node.setSize([node.size[0], size[1]]);
}

function showText(node, text, { fit = false } = {}) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets["STRING"](node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.85;
    widget.inputEl.style.whiteSpace = "pre-wrap"; // lines wrap ...
    widget.inputEl.style.overflowWrap = "anywhere"; // ... and so do long paths: nothing scrolls sideways
    widget.serialize = false; // not saved into the workflow
    (widget.options ??= {}).serialize = false; // not sent with the prompt (graphToPrompt reads this one)
  }
  widget.value = text;
  node.onResize?.(node.size);
  if (fit && !SCROLLED.has(node.type)) requestAnimationFrame(() => fitText(node, widget)); // once it is laid out
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
      showText(this, Array.isArray(text) ? text.join("\n") : String(text), { fit: true });
    };
  },
});

// The templates browser of ComfyUI 0.3.64 (frontend 1.27.10) shows a custom node pack's templates by file name only,
// the name again as the description. Each of this pack's templates carries its description in the workflow file
// ("extra" -> "visionzip" -> "description"): put it on the template's card. Cards of other packs are left alone.
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/").slice(-2, -1)[0] ?? "");
const described = new Map(); // template name -> Promise of its description ("" when it has none)

function description(name) {
  if (!described.has(name)) {
    const url = `/workflow_templates/${encodeURIComponent(PACK)}/${encodeURIComponent(name)}.json`;
    described.set(name, api.fetchApi(url).then((r) => (r.ok ? r.json() : null))
      .then((workflow) => String(workflow?.extra?.visionzip?.description ?? ""))
      .catch(() => ""));
  }
  return described.get(name);
}

function listedUnderThisPack(card) {
  // the cards of one category are listed under its title (the pack's folder name)
  const heading = card.closest(".p-dataview")?.querySelector('[data-pc-section="header"]')?.innerText ?? "";
  return heading.split("\n").some((line) => line.trim() === PACK);
}

function describeCards() {
  for (const card of document.querySelectorAll('[data-testid^="template-workflow-"]')) {
    if (!listedUnderThisPack(card)) continue; // ComfyUI's own templates, another pack's
    const name = card.dataset.testid.slice("template-workflow-".length);
    const shown = card.querySelector("p");
    if (!shown || shown.dataset.visionzip === name) continue;
    shown.dataset.visionzip = name;
    description(name).then((text) => {
      if (!text) return;
      shown.textContent = text;
      shown.title = text;
    });
  }
}

if (PACK) {
  let pending = false;
  new MutationObserver(() => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      describeCards();
    });
  }).observe(document.body, { childList: true, subtree: true });
}
