// The Inputs panel: files dropped (or chosen) are stored on the server by SHA-256 (`PUT /f/{sha}`)
// and referenced from the definition (`inputs[name] = {type: "key"}`), so the URL stays small
// and still is the whole job; small text files live in the URL (`inputs` hash param) and are
// edited in place.

import type { DataRefJson, DefinitionJson } from "../definition";
import type { Draft } from "./editor";
import { formatBytes, h, replace } from "./dom";

export interface InputsHost {
  readonly job: DefinitionJson;
  readonly textFiles: Record<string, string>;
  /** Inputs that came from the metaframe (read-only here). */
  readonly metaframeInputs: Record<string, DataRefJson>;
  /** Store bytes on the server; returns the key. */
  upload(bytes: Uint8Array): Promise<string>;
  /** Apply a change to the state's definition or text files. */
  edit(change: (draft: Draft) => void): void;
}

export class InputsPanel {
  readonly element = h("div.panel.inputs");
  private status = h("p.hint.upload-status", { role: "status" });
  private sizes = new Map<string, number>();

  constructor(private host: InputsHost) {
    this.render();
  }

  count(): number {
    const job = this.host.job;
    return Object.keys(job.inputs ?? {}).length + Object.keys(this.host.textFiles).length + Object.keys(this.host.metaframeInputs).length;
  }

  render(): void {
    const picker = h("input", { type: "file", multiple: true, style: { display: "none" } });
    picker.addEventListener("change", () => void this.addFiles([...(picker.files ?? [])]));
    const zone = h(
      "div.dropzone",
      { tabIndex: 0, role: "button", "aria-label": "Add files: drop them here or press Enter to choose", onclick: () => picker.click(), onkeydown: (e: KeyboardEvent) => e.key === "Enter" && picker.click() },
      h("strong", {}, "Drop files here"),
      h("span", {}, " or click to choose. They appear in the container at /inputs/<name>."),
      picker,
    );
    zone.addEventListener("dragover", (e) => {
      e.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      void this.addFiles([...(e.dataTransfer?.files ?? [])]);
    });
    replace(
      this.element,
      h("h2", {}, "Files"),
      zone,
      this.status,
      this.fileList(),
      h("h2", {}, "Text files"),
      h("p.hint", {}, "Kept in the URL and edited here; the container sees them at /inputs/<name>."),
      this.textFileEditors(),
      this.metaframeList(),
    );
  }

  /** Upload dropped files and add them to the definition. */
  async addFiles(files: File[]): Promise<void> {
    if (!files.length) return;
    const added: Record<string, DataRefJson> = {};
    for (const file of files) {
      this.status.textContent = `Uploading ${file.name} (${formatBytes(file.size)})…`;
      try {
        const key = await this.host.upload(new Uint8Array(await file.arrayBuffer()));
        added[file.name] = { type: "key", value: key };
        this.sizes.set(key, file.size);
      } catch (error) {
        this.status.textContent = `${file.name}: ${(error as Error).message}`;
        return;
      }
    }
    this.status.textContent = `Added ${files.map((f) => f.name).join(", ")}`;
    this.host.edit(({ job }) => (job.inputs = { ...job.inputs, ...added })); // the job of now, not of the drop
    this.render();
  }

  private fileList(): HTMLElement {
    const job = this.host.job;
    const entries = Object.entries(job.inputs ?? {});
    if (!entries.length) return h("p.empty", {}, "No files yet.");
    return h(
      "ul.files",
      {},
      entries.map(([name, ref]) =>
        h(
          "li",
          {},
          h("code", {}, name),
          h("span.meta", {}, describeRef(ref, this.sizes)),
          h(
            "button.icon",
            {
              type: "button",
              title: `Remove ${name}`,
              onclick: () => {
                this.host.edit((draft) => {
                  if (!draft.job.inputs) return;
                  delete draft.job.inputs[name];
                  if (!Object.keys(draft.job.inputs).length) delete draft.job.inputs;
                });
                this.render();
              },
            },
            "✕",
          ),
        ),
      ),
    );
  }

  private textFileEditors(): HTMLElement {
    const files = this.host.textFiles;
    const editors = Object.entries(files).map(([name, text]) => {
      const area = h("textarea.code", { rows: Math.min(12, Math.max(3, text.split("\n").length + 1)), name: `text.${name}`, value: text, spellcheck: false, "aria-label": `Text of ${name}` });
      area.addEventListener("input", () => {
        this.host.edit((draft) => (draft.textFiles[name] = area.value));
      });
      const remove = () => {
        this.host.edit((draft) => delete draft.textFiles[name]);
        this.render();
      };
      return h("div.textfile", {}, h("div.row", {}, h("code", {}, name), h("button.icon", { type: "button", title: `Remove ${name}`, onclick: remove }, "✕")), area);
    });
    const name = h("input", { placeholder: "script.py", name: "text.new", "aria-label": "New text file name" });
    const add = () => {
      const value = name.value.trim().replace(/^\/+/, "");
      if (!value || value in files) return;
      this.host.edit((draft) => (draft.textFiles[value] = ""));
      this.render();
    };
    name.addEventListener("keydown", (e) => e.key === "Enter" && add());
    return h("div", {}, editors, h("div.row", {}, name, h("button", { type: "button", onclick: add }, "New text file")));
  }

  private metaframeList(): HTMLElement | null {
    const entries = Object.entries(this.host.metaframeInputs);
    if (!entries.length) return null;
    return h(
      "div",
      {},
      h("h2", {}, "From the metaframe"),
      h("ul.files", {}, entries.map(([name, ref]) => h("li", {}, h("code", {}, name), h("span.meta", {}, describeRef(ref, this.sizes))))),
    );
  }
}

function describeRef(ref: DataRefJson, sizes: Map<string, number>): string {
  const type = ref.type ?? "utf8";
  if (type === "key") {
    const size = sizes.get(String(ref.value));
    return `stored${size !== undefined ? `, ${formatBytes(size)}` : ""}`;
  }
  if (type === "base64") return `inline, ${formatBytes(Math.floor((String(ref.value).length * 3) / 4))}`;
  if (type === "url") return String(ref.value);
  return `${type}, ${formatBytes(JSON.stringify(ref.value).length)}`;
}
