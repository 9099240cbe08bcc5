// Shows the text a VisionZip node returns (answers, summaries) on the node itself.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

app.registerExtension({
  name: "VisionZip.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("VisionZip")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (!text || !text.length) return;
      let widget = this.widgets?.find((w) => w.name === "visionzip_output");
      if (!widget) {
        widget = ComfyWidgets["STRING"](this, "visionzip_output", ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.inputEl.style.opacity = 0.85;
        widget.serialize = false; // display only: never saved into workflows or prompts
      }
      widget.value = Array.isArray(text) ? text.join("\n") : String(text);
      this.onResize?.(this.size);
      app.graph.setDirtyCanvas(true, false);
    };
  },
});
