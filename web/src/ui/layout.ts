// The page: header (queue, panel tabs), the terminal, one side panel, and the footer with the
// job's state and the Run / Cancel / Delete-and-retry button. One column on a phone.

import type { App } from "../app";
import { LogKind, LogStream } from "../gen/jobwire/v1/jobs_pb";
import { Editor } from "./editor";
import { h, replace } from "./dom";
import { InputsPanel } from "./inputs";
import { OutputsPanel } from "./outputs";
import { QueuePanel } from "./queue";
import { LogTerminal } from "./terminal";

export type Tab = "terminal" | "job" | "inputs" | "outputs" | "queue";
const TABS: [Tab, string][] = [
  ["terminal", "Terminal"],
  ["job", "Job"],
  ["inputs", "Inputs"],
  ["outputs", "Outputs"],
  ["queue", "Queue"],
];

export class Layout {
  readonly terminal: LogTerminal;
  readonly editor: Editor;
  readonly inputs: InputsPanel;
  readonly outputs = new OutputsPanel();
  readonly queuePanel: QueuePanel;
  private tabButtons = new Map<Tab, HTMLButtonElement>();
  private main = h("main");
  private queueInput = h("input#queue", { placeholder: "queue name or URL", spellcheck: false, autocomplete: "off" });
  private statusText = h("strong.state-text");
  private statusDetail = h("span.state-detail");
  private statusBox = h("div#status.status", { role: "status" }, h("span.dot"), h("span.words", {}, this.statusText, this.statusDetail));
  private idLink = h("a.job-id", { title: "This job's page" });
  private actionButton = h("button#action.primary", { type: "button" });
  private connection = h("span.connection");
  private error = h("div.error-bar", { role: "alert", hidden: true });
  private queueSummary = h("span.queue-summary");
  private userChoseTab = false;

  constructor(private app: App) {
    const termBox = h("div.terminal");
    this.terminal = new LogTerminal(termBox);
    this.editor = new Editor(app);
    this.inputs = new InputsPanel(app);
    this.queuePanel = new QueuePanel((id) => window.open(`/j/${id}${this.queueHash()}`, "_blank"), (s) => (this.queueSummary.textContent = s));
    this.queueInput.addEventListener("change", () => app.setQueue(this.queueInput.value));
    this.actionButton.addEventListener("click", () => this.act());

    const tabs = h("nav.tabs", {}, TABS.map(([tab, label]) => {
      const button = h("button", { type: "button", dataset: { tab }, onclick: () => this.select(tab) }, label);
      this.tabButtons.set(tab, button);
      return button;
    }));
    const copy = this.copyControls();
    replace(
      this.main,
      h("section.terminal-pane", {}, h("div.terminal-bar", {}, h("span", {}, "Logs"), copy), termBox),
      h("section.side", {}, this.editor.element, this.inputs.element, this.outputs.element, this.queuePanel.element),
    );
    const header = h(
      "header",
      {},
      h("a.brand", { href: "/", title: "jobwire: run a container from a URL" }, "jobwire"),
      h("label.queue-field", {}, h("span", {}, "Queue"), this.queueInput),
      tabs,
    );
    const footer = h("footer", {}, this.statusBox, this.idLink, this.queueSummary, this.connection, this.actionButton);
    document.body.replaceChildren(header, this.error, this.main, footer);
    const first: Tab = Object.keys(app.textFiles).length && !app.hash.bool("terminal") ? "inputs" : "job";
    this.select(window.matchMedia("(max-width: 800px)").matches ? "terminal" : first);
    this.userChoseTab = false;
    this.rerenderQueue();
  }

  /** Rebuild the forms from the app's state (the URL changed). */
  rerender(): void {
    this.editor.render();
    this.inputs.render();
    this.rerenderQueue();
    this.counts();
  }

  rerenderQueue(): void {
    const target = this.app.target;
    this.queueInput.value = this.app.hash.get("queueOverride") && !this.app.hash.bool("ignoreQueueOverride")
      ? this.app.hash.get("queueOverride")!
      : this.app.hash.get("queue") || target.queue;
    this.queuePanel.setQueue(target.api, target.queue);
  }

  counts(): void {
    const label = (tab: Tab, n: number) => {
      const base = TABS.find(([t]) => t === tab)![1];
      this.tabButtons.get(tab)!.textContent = n ? `${base} (${n})` : base;
    };
    label("inputs", this.inputs.count());
    label("outputs", this.outputs.count());
  }

  select(tab: Tab, automatic = false): void {
    if (automatic && (this.userChoseTab || window.matchMedia("(max-width: 800px)").matches)) return;
    if (!automatic) this.userChoseTab = true;
    this.main.dataset.tab = tab;
    for (const [name, button] of this.tabButtons) button.classList.toggle("active", name === tab);
    const panels: Record<string, HTMLElement> = {
      job: this.editor.element,
      inputs: this.inputs.element,
      outputs: this.outputs.element,
      queue: this.queuePanel.element,
    };
    for (const [name, element] of Object.entries(panels)) element.hidden = name !== tab && !(tab === "terminal" && name === "job");
    this.queuePanel.setVisible(tab === "queue");
    requestAnimationFrame(() => this.terminal.resize());
  }

  showState(): void {
    const state = this.app.state();
    this.statusBox.dataset.tone = state.tone;
    this.statusBox.dataset.state = state.state;
    this.statusText.textContent = state.text;
    this.statusDetail.textContent = state.detail ? ` — ${state.detail}` : "";
    this.statusBox.title = state.detail ? `${state.text}: ${state.detail}` : state.text;
    const id = this.app.jobId;
    this.idLink.textContent = id ? id.slice(0, 8) : "";
    this.idLink.href = id ? `/j/${id}${this.queueHash()}` : "#";
    this.idLink.dataset.id = id;
    const action = this.app.action();
    const labels = { run: "Run", cancel: "Cancel", retry: "Delete & retry", none: "Run" };
    this.actionButton.textContent = labels[action];
    this.actionButton.dataset.action = action;
    this.actionButton.disabled = action === "none";
    this.actionButton.className = action === "cancel" ? "danger" : "primary";
  }

  showConnection(problem: string | undefined): void {
    this.connection.textContent = problem ?? "";
    this.connection.title = problem ?? "";
  }

  showError(message: string): void {
    this.error.textContent = message;
    this.error.hidden = false;
    setTimeout(() => (this.error.hidden = true), 8000);
  }

  private queueHash(): string {
    const queue = this.app.hash.get("queueOverride") || this.app.hash.get("queue") || this.app.target.queue;
    return queue ? `#?queue=${encodeURIComponent(queue)}` : "";
  }

  private act(): void {
    this.error.hidden = true;
    const action = this.app.action();
    if (action === "run") void this.app.run();
    else if (action === "cancel") void this.app.cancel();
    else if (action === "retry") void this.app.deleteAndRetry();
  }

  private copyControls(): HTMLElement {
    const mode = h(
      "select",
      { title: "Which log to copy", name: "copy-mode" },
      h("option", { value: "all" }, "stdout + stderr"),
      h("option", { value: "stdout" }, "stdout"),
      h("option", { value: "stderr" }, "stderr"),
      h("option", { value: "build" }, "build"),
    );
    const button = h("button.small", { type: "button" }, "Copy logs");
    button.addEventListener("click", async () => {
      if (!this.app.jobId) return;
      const kind = mode.value === "build" ? LogKind.BUILD : LogKind.RUN;
      const wanted = mode.value === "stdout" ? LogStream.STDOUT : mode.value === "stderr" ? LogStream.STDERR : undefined;
      try {
        const chunks = await this.app.fullLogs(kind);
        const text = chunks.filter((c) => wanted === undefined || c.stream === wanted).map((c) => c.text).join("");
        await copyText(text);
        button.textContent = "Copied";
      } catch (error) {
        button.textContent = "Copy failed";
        this.showError(`Copy failed: ${(error as Error).message}`);
      }
      setTimeout(() => (button.textContent = "Copy logs"), 1500);
    });
    return h("div.copy", {}, mode, button);
  }
}

async function copyText(text: string): Promise<void> {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = h("textarea", { value: text, style: { position: "fixed", opacity: "0" } });
  document.body.appendChild(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}
