// The Outputs panel: a finished job's files with their sizes, a preview of text and images,
// download of one file or of all of them as a zip.

import { zipSync } from "fflate";
import { fetchOutput, type Api } from "../api";
import type { DataRefJson } from "../definition";
import { base64ToBytes } from "../hashparams";
import { formatBytes, h, replace, saveBlob } from "./dom";

const IMAGE = /\.(png|jpe?g|gif|webp|svg|bmp|avif)$/i;
const PREVIEW_LIMIT = 256 * 1024;

export class OutputsPanel {
  readonly element = h("div.panel.outputs");
  private outputs: Record<string, DataRefJson> = {};
  private api?: Api;
  private jobId = "";
  private preview = h("div.preview");

  constructor() {
    this.show(undefined, "", {});
  }

  count(): number {
    return Object.keys(this.outputs).length;
  }

  /** Show the outputs of a finished job (or none). */
  show(api: Api | undefined, jobId: string, outputs: Record<string, DataRefJson>): void {
    this.api = api;
    this.jobId = jobId;
    this.outputs = outputs;
    replace(this.preview);
    const names = Object.keys(outputs).sort();
    if (!names.length) {
      replace(this.element, h("h2", {}, "Outputs"), h("p.empty", {}, jobId ? "This job left no files in /outputs." : "Files the job writes to /outputs appear here when it finishes."));
      return;
    }
    const rows = names.map((name) => {
      const size = h("span.meta.size", {}, "…");
      void this.size(outputs[name]).then((n) => (size.textContent = n === undefined ? "" : formatBytes(n)));
      return h(
        "li",
        { dataset: { name } },
        h("button.link", { type: "button", title: "Preview", onclick: () => void this.showPreview(name) }, name),
        size,
        h("button", { type: "button", className: "download", onclick: () => void this.download(name) }, "Download"),
      );
    });
    replace(
      this.element,
      h("div.row.spread", {}, h("h2", {}, "Outputs"), h("button", { type: "button", className: "download-all", onclick: () => void this.downloadAll() }, `Download all (${names.length})`)),
      h("ul.files.outputs-list", {}, rows),
      this.preview,
    );
    const first = names.find((n) => !IMAGE.test(n)) ?? names[0];
    void this.showPreview(first);
  }

  private async size(ref: DataRefJson): Promise<number | undefined> {
    if (ref.type === "base64") return base64ToBytes(String(ref.value)).length;
    if (ref.type === "key" && this.api) {
      try {
        return Number((await this.api.files.getFileInfo({ key: String(ref.value) })).size);
      } catch {
        return undefined;
      }
    }
    if (ref.type === "utf8" || ref.type === undefined) return new TextEncoder().encode(String(ref.value)).length;
    return undefined;
  }

  /** The bytes of one output: decoded locally when inline, fetched otherwise. */
  async bytes(name: string): Promise<Blob> {
    const ref = this.outputs[name];
    if (ref.type === "base64") return new Blob([base64ToBytes(String(ref.value)) as BlobPart]);
    if (ref.type === "utf8" || ref.type === undefined) return new Blob([String(ref.value)]);
    if (ref.type === "json") return new Blob([JSON.stringify(ref.value)]);
    if (!this.api) throw new Error("no server");
    return fetchOutput(this.api, this.jobId, name);
  }

  private async showPreview(name: string): Promise<void> {
    replace(this.preview, h("p.hint", {}, `Loading ${name}…`));
    try {
      const blob = await this.bytes(name);
      if (IMAGE.test(name)) {
        const type = name.toLowerCase().endsWith(".svg") ? "image/svg+xml" : blob.type;
        const url = URL.createObjectURL(new Blob([blob], { type }));
        const img = h("img", { src: url, alt: name });
        img.addEventListener("load", () => URL.revokeObjectURL(url));
        replace(this.preview, h("h3", {}, name), img);
        return;
      }
      const head = new Uint8Array(await blob.slice(0, PREVIEW_LIMIT).arrayBuffer());
      if (head.includes(0)) {
        replace(this.preview, h("h3", {}, name), h("p.hint", {}, "Binary file: no preview."));
        return;
      }
      const text = new TextDecoder().decode(head);
      const more = blob.size > PREVIEW_LIMIT ? `\n… (${formatBytes(blob.size - PREVIEW_LIMIT)} more)` : "";
      replace(this.preview, h("h3", {}, name), h("pre.text-preview", {}, text + more));
    } catch (error) {
      replace(this.preview, h("p.error", {}, `${name}: ${(error as Error).message}`));
    }
  }

  private async download(name: string): Promise<void> {
    saveBlob(await this.bytes(name), name.split("/").pop() || name);
  }

  private async downloadAll(): Promise<void> {
    const files: Record<string, Uint8Array> = {};
    for (const name of Object.keys(this.outputs)) {
      files[name] = new Uint8Array(await (await this.bytes(name)).arrayBuffer());
    }
    const zipped = zipSync(files, { level: 6 });
    saveBlob(new Blob([zipped as BlobPart], { type: "application/zip" }), `jobwire-${this.jobId.slice(0, 8)}-outputs.zip`);
  }
}
