// The page: header (queue, panel tabs), the terminal, one side panel, and the footer with the
// job's state, the command it runs, and two controls that never trade places: Cancel (only while
// the job is queued or running) and Run. One column on a phone.
//
// `render()` draws everything from the app's state; the views' events go up through
// `PageEvents` (the layout never changes the state itself).

import type { Api } from "../api";
import type { DataRefJson, DefinitionJson } from "../definition";
import { LogKind, LogStream, type Job, type LogChunk } from "../gen/jobwire/v1/jobs_pb";
import type { HashParams } from "../hashparams";
import type { Action, Footer } from "./status";
import { Editor, type Draft } from "./editor";
import { h, replace } from "./dom";
import { helpPanel } from "./help";
import { InputsPanel } from "./inputs";
import { OutputsPanel } from "./outputs";
import { QueuePanel } from "./queue";
import { LogTerminal, SCROLLBACK_LINES } from "./terminal";

export type Tab = "terminal" | "job" | "inputs" | "outputs" | "queue" | "help";
const TABS: [Tab, string][] = [
  ["terminal", "Terminal"],
  ["job", "Job"],
  ["inputs", "Inputs"],
  ["outputs", "Outputs"],
  ["queue", "Queue"],
  ["help", "Help"],
];
const PHONE = "(max-width: 800px)";

/** What the views read: the app's state (read-only here). */
export interface PageState {
  readonly hash: HashParams;
  readonly job: DefinitionJson;
  readonly textFiles: Record<string, string>;
  readonly metaframeInputs: Record<string, DataRefJson>;
  readonly jobId: string;
  readonly current: Job | undefined;
  readonly target: { api: Api; queue: string };
  readonly error: string;
  readonly connection: string;
  readonly outputs: { api?: Api; jobId: string; files: Record<string, DataRefJson> };
  readonly formVersion: number;
  readonly runLockedUntil: number;
  readonly logsDropped: boolean;
  readonly serverQueue: string;
  state(): Footer;
  action(): Action;
}

/** What the views ask for. */
export interface PageEvents {
  /** Apply a change to the definition, text files or URL parameters; the URL and job id follow. */
  edit(change: (draft: Draft) => void): void;
  upload(bytes: Uint8Array): Promise<string>;
  setQueue(value: string): void;
  run(): Promise<void>;
  cancel(): Promise<void>;
  cancelForEveryone(queue: string, jobId: string): Promise<void>;
  deleteAndRetry(): Promise<void>;
  fullLogs(kind: LogKind): Promise<LogChunk[]>;
  showError(message: string): void;
}

export class Layout {
  readonly terminal: LogTerminal;
  readonly editor: Editor;
  readonly inputs: InputsPanel;
  readonly outputs = new OutputsPanel();
  readonly queuePanel: QueuePanel;
  private tabButtons = new Map<Tab, HTMLButtonElement>();
  private main = h("main");
  private queueInput = h("input#queue", {
    placeholder: "queue name or URL",
    spellcheck: false,
    autocomplete: "off",
    "aria-describedby": "queue-hint",
  });
  private queueOptions = h("datalist#queue-options");
  private queueHint = h("span#queue-hint.hint");
  private statusText = h("strong.state-text");
  private statusDetail = h("span.state-detail");
  private statusBox = h("div#status.status", { role: "status" }, h("span.dot", { "aria-hidden": "true" }), h("span.words", {}, this.statusText, this.statusDetail));
  private command = h("code#command.command", { title: "What Run runs" });
  private idLink = h("a.job-id", { title: "This job's page" });
  private cancelButton = h("button#cancel.danger", { type: "button", title: "Cancel this job (for this page's namespace)" }, "Cancel");
  private runButton = h("button#run.primary", { type: "button" }, "Run");
  private connection = h("span.connection");
  private error = h("div.error-bar", { role: "alert", hidden: true });
  private queueSummary = h("span.queue-summary");
  private dropped = h("p.dropped-notice", { hidden: true });
  private confirm: HTMLDialogElement;
  private userChoseTab = false;
  private drawn = { formVersion: -1, outputs: undefined as unknown, queueKey: "", jobKey: "" };

  constructor(
    private state: PageState,
    private events: PageEvents,
  ) {
    const termBox = h("div.terminal");
    // Escape leaves the terminal for the panel beside it (always focusable, never an action).
    // On a phone, where the terminal is a tab of its own, it leaves for the tabs.
    this.terminal = new LogTerminal(termBox, () => {
      const side = this.main.querySelector(".side") as HTMLElement;
      if (side.offsetParent) side.focus();
      else this.tabButtons.get("job")!.focus();
    });
    // The forms read the definition from the state and report each edit up.
    this.editor = new Editor({
      get job() { return state.job; },
      get hash() { return state.hash; },
      edit: (change) => events.edit(change),
    });
    this.inputs = new InputsPanel({
      get job() { return state.job; },
      get textFiles() { return state.textFiles; },
      get metaframeInputs() { return state.metaframeInputs; },
      upload: (bytes) => events.upload(bytes),
      edit: (change) => events.edit(change),
    });
    this.queuePanel = new QueuePanel(
      (id) => window.open(`/j/${id}${this.queueHash()}`, "_blank"),
      (s) => (this.queueSummary.textContent = s),
      (queue, id) => this.askCancelForEveryone(queue, id),
    );
    this.queueInput.setAttribute("list", "queue-options");
    // Every keystroke counts (debounced by the app): Run is enabled as soon as a queue is typed.
    this.queueInput.addEventListener("input", () => events.setQueue(this.queueInput.value));
    this.runButton.addEventListener("click", () => {
      if (this.state.action() === "retry") void events.deleteAndRetry();
      else void events.run();
    });
    this.cancelButton.addEventListener("click", () => void events.cancel());
    this.confirm = this.confirmDialog();

    const tabs = h(
      "nav.tabs",
      { "aria-label": "Panels" },
      TABS.map(([tab, label]) => {
        const button = h("button", { type: "button", dataset: { tab }, onclick: () => this.select(tab) }, label);
        this.tabButtons.set(tab, button);
        return button;
      }),
    );
    replace(
      this.main,
      h(
        "section.terminal-pane",
        { "aria-label": "Logs" },
        h("div.terminal-bar", {}, h("span", {}, "Logs ", h("span.hint", {}, "(Escape leaves the terminal)")), this.copyControls()),
        this.dropped,
        termBox,
      ),
      h("section.side", { "aria-label": "Panel", tabIndex: 0 }, this.editor.element, this.inputs.element, this.outputs.element, this.queuePanel.element, helpPanel()),
    );
    const header = h(
      "header",
      {},
      h("a.brand", { href: "/", title: "jobwire: run a container from a URL" }, "jobwire"),
      h("label.queue-field", {}, h("span", {}, "Queue"), this.queueInput),
      this.queueOptions,
      this.queueHint,
      tabs,
    );
    const footer = h(
      "footer",
      {},
      h("div.footer-job", {}, this.statusBox, h("div.footer-line", {}, this.command, this.idLink, this.queueSummary, this.connection)),
      h("div.actions", {}, this.cancelButton, this.runButton),
    );
    document.body.replaceChildren(header, this.error, this.main, footer, this.confirm);
    const firstVisit = !state.hash.get("job") && !location.pathname.startsWith("/j/");
    const first: Tab = firstVisit ? "help" : Object.keys(state.textFiles).length && !state.hash.bool("terminal") ? "inputs" : "job";
    this.select(window.matchMedia(PHONE).matches && !firstVisit ? "terminal" : first);
    this.userChoseTab = false;
  }

  /** Draw every view from the state. */
  render(): void {
    const state = this.state;
    if (this.drawn.formVersion !== state.formVersion) {
      this.drawn.formVersion = state.formVersion;
      this.editor.render();
      this.inputs.render();
    }
    if (this.drawn.outputs !== state.outputs) {
      this.drawn.outputs = state.outputs;
      this.outputs.show(state.outputs.api, state.outputs.jobId, state.outputs.files);
      if (Object.keys(state.outputs.files).length) this.select("outputs", true);
    }
    // The queue field shows the queue in use, except while someone types in it.
    const shown = state.hash.get("queueOverride") && !state.hash.bool("ignoreQueueOverride") ? state.hash.get("queueOverride")! : state.hash.get("queue") || state.target.queue;
    if (document.activeElement !== this.queueInput) this.queueInput.value = shown;
    replace(this.queueOptions, state.serverQueue ? h("option", { value: state.serverQueue }) : null);
    this.queueHint.textContent = state.serverQueue && state.target.queue === state.serverQueue ? `this server's queue, with a live worker` : "";
    const target = state.target;
    const queueKey = `${target.api.origin} ${target.queue}`;
    if (queueKey !== this.drawn.queueKey) {
      this.drawn.queueKey = queueKey;
      this.queuePanel.setQueue(target.api, target.queue);
    }
    const jobKey = `${state.current?.id} ${state.current?.state} ${state.current?.attempt}`;
    if (jobKey !== this.drawn.jobKey) {
      this.drawn.jobKey = jobKey;
      void this.queuePanel.refresh(); // the queue's counts changed with this job
    }
    this.counts();
    this.showState();
    this.error.textContent = state.error;
    this.error.hidden = !state.error;
    this.connection.textContent = state.connection;
    this.connection.title = state.connection;
    this.dropped.hidden = !state.logsDropped;
    if (state.logsDropped) {
      replace(
        this.dropped,
        `Earlier lines are not shown: the terminal keeps the last ${SCROLLBACK_LINES.toLocaleString("en")} lines. `,
        h("a", { href: this.fullLogUrl(), target: "_blank", rel: "noopener" }, "Open the full log"),
      );
    }
  }

  private counts(): void {
    const label = (tab: Tab, n: number) => {
      const base = TABS.find(([t]) => t === tab)![1];
      this.tabButtons.get(tab)!.textContent = n ? `${base} (${n})` : base;
    };
    label("inputs", this.inputs.count());
    label("outputs", this.outputs.count());
  }

  select(tab: Tab, automatic = false): void {
    if (automatic && (this.userChoseTab || window.matchMedia(PHONE).matches)) return;
    if (!automatic) this.userChoseTab = true;
    this.main.dataset.tab = tab;
    for (const [name, button] of this.tabButtons) {
      button.classList.toggle("active", name === tab);
      if (name === tab) button.setAttribute("aria-current", "true");
      else button.removeAttribute("aria-current");
    }
    const panels: Record<string, Element> = {
      job: this.editor.element,
      inputs: this.inputs.element,
      outputs: this.outputs.element,
      queue: this.queuePanel.element,
      help: this.main.querySelector(".help")!,
    };
    for (const [name, element] of Object.entries(panels)) (element as HTMLElement).hidden = name !== tab && !(tab === "terminal" && name === "job");
    this.queuePanel.setVisible(tab === "queue");
    requestAnimationFrame(() => this.terminal.resize());
  }

  private showState(): void {
    const state = this.state.state();
    this.statusBox.dataset.tone = state.tone;
    this.statusBox.dataset.state = state.state;
    this.statusText.textContent = state.text;
    this.statusDetail.textContent = state.detail ? ` — ${state.detail}` : "";
    this.statusBox.title = state.detail ? `${state.text}: ${state.detail}` : state.text;
    const id = this.state.jobId;
    this.idLink.textContent = id ? id.slice(0, 8) : "";
    this.idLink.hidden = !id;
    this.idLink.href = id ? `/j/${id}${this.queueHash()}` : "#";
    this.idLink.dataset.id = id;
    const job = this.state.job;
    const image = job.build ? "(built from a Dockerfile)" : job.image || "";
    this.command.textContent = image ? `${image}${job.command ? ` $ ${job.command}` : ""}` : "";
    this.command.hidden = !image;
    // Run and Cancel each keep their place and meaning; Run rests 600 ms after a click.
    const action = this.state.action();
    const locked = performance.now() < this.state.runLockedUntil;
    this.runButton.textContent = action === "retry" ? "Run again" : "Run";
    this.runButton.title = action === "retry" ? "Delete the stored result and run the job again" : "Run this job";
    this.runButton.dataset.action = action === "cancel" ? "none" : action;
    this.runButton.disabled = action === "none" || action === "cancel" || locked;
    this.cancelButton.hidden = action !== "cancel";
  }

  private queueHash(): string {
    const queue = this.state.hash.get("queueOverride") || this.state.hash.get("queue") || this.state.target.queue;
    return queue ? `#?queue=${encodeURIComponent(queue)}` : "";
  }

  /** The whole run log as text, on the server that holds it. */
  private fullLogUrl(): string {
    const { api, queue } = this.state.target;
    const id = this.state.jobId;
    return queue ? `${api.origin}/q/${encodeURIComponent(queue)}/j/${id}/stream?text=true` : `${api.origin}/j/${id}/stream?text=true`;
  }

  private confirmDialog(): HTMLDialogElement {
    const dialog = h(
      "dialog#confirm-cancel",
      { "aria-labelledby": "confirm-title", "aria-describedby": "confirm-text" },
      h("h2#confirm-title", {}, "Cancel this job for everyone?"),
      h("p#confirm-text", {}, ""),
      h(
        "form.row",
        { method: "dialog" },
        h("button.keep", { type: "submit", value: "keep" }, "Keep it"),
        h("button.danger", { type: "submit", value: "cancel" }, "Cancel for everyone"),
      ),
    );
    return dialog;
  }

  private askCancelForEveryone(queue: string, jobId: string): void {
    const dialog = this.confirm;
    dialog.querySelector("#confirm-text")!.textContent =
      `Job ${jobId.slice(0, 12)} on queue ${queue} stops for every user who submitted it, not only for you.`;
    dialog.returnValue = "";
    dialog.addEventListener(
      "close",
      () => {
        if (dialog.returnValue === "cancel") void this.events.cancelForEveryone(queue, jobId).then(() => this.queuePanel.refresh());
      },
      { once: true },
    );
    dialog.showModal();
    (dialog.querySelector("button.keep") as HTMLButtonElement).focus();
  }

  private copyControls(): HTMLElement {
    const mode = h(
      "select",
      { title: "Which log to copy", name: "copy-mode", "aria-label": "Which log to copy" },
      h("option", { value: "all" }, "stdout + stderr"),
      h("option", { value: "stdout" }, "stdout"),
      h("option", { value: "stderr" }, "stderr"),
      h("option", { value: "build" }, "build"),
    );
    const button = h("button.small", { type: "button" }, "Copy logs");
    button.addEventListener("click", async () => {
      if (!this.state.jobId) return;
      const kind = mode.value === "build" ? LogKind.BUILD : LogKind.RUN;
      const wanted = mode.value === "stdout" ? LogStream.STDOUT : mode.value === "stderr" ? LogStream.STDERR : undefined;
      try {
        const chunks = await this.events.fullLogs(kind);
        const text = chunks.filter((c) => wanted === undefined || c.stream === wanted).map((c) => c.text).join("");
        await copyText(text);
        button.textContent = "Copied";
      } catch (error) {
        button.textContent = "Copy failed";
        this.events.showError(`Copy failed: ${(error as Error).message}`);
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
