// Shows the text a VisionZip node returns (answers, summaries) on the node itself, and the answer
// while it is being generated (the "visionzip.text" messages Answer and Chat send).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === "visionzip_output");
  if (!widget) {
    widget = ComfyWidgets["STRING"](node, "visionzip_output", ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.85;
    widget.serialize = false; // display only: never saved into workflows or prompts
  }
  widget.value = text;
  node.onResize?.(node.size);
  app.graph.setDirtyCanvas(true, false);
}

app.registerExtension({
  name: "VisionZip.ShowText",
  setup() {
    api.addEventListener("visionzip.text", ({ detail }) => {
      const node = app.graph?.getNodeById(Number(detail?.node)) ?? app.graph?.getNodeById(detail?.node);
      if (node && typeof detail.text === "string") showText(node, detail.text + " \u258c"); // a cursor: still writing
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("VisionZip")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (!text || !text.length) return;
      showText(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});
