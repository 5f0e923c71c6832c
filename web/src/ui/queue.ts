// The Queue panel: the queue's waiting and running jobs and its workers (slots, GPUs, running
// jobs), refreshed every few seconds while the panel is visible (there is no queue stream).

import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { Api } from "../api";
import { JobState, type GetQueueStatusResponse, type Job } from "../gen/jobwire/v1/jobs_pb";
import { debounce, formatSeconds, h, replace } from "./dom";
import { seconds } from "./status";

const REFRESH_MS = 3000;

export class QueuePanel {
  readonly element = h("div.panel.queue");
  private timer: ReturnType<typeof setInterval> | undefined;
  private target?: { api: Api; queue: string };
  summary = "";
  private definitions = new Map<string, Promise<{ image: string; command: string }>>();

  constructor(
    private open: (jobId: string) => void,
    private onSummary: (text: string) => void,
    /** A row's Cancel: cancels for every user, so the layout asks first. */
    private onCancel: (queue: string, jobId: string) => void,
  ) {
    replace(this.element, h("h2", {}, "Queue"), h("p.empty", {}, "Choose a queue."));
  }

  /** Follow a queue (or none); the first at once, a changed one once the name stops changing (it is typed key by key). */
  setQueue(api: Api | undefined, queue: string): void {
    const first = !this.target;
    this.target = api && queue ? { api, queue } : undefined;
    if (first) void this.refresh();
    else this.refreshSoon();
  }

  private refreshSoon = debounce(() => void this.refresh(), 400);

  /** Poll while visible; stop when hidden. */
  setVisible(visible: boolean): void {
    clearInterval(this.timer);
    this.timer = undefined;
    if (visible) {
      void this.refresh();
      this.timer = setInterval(() => document.visibilityState === "visible" && void this.refresh(), REFRESH_MS);
    }
  }

  async refresh(): Promise<void> {
    const target = this.target;
    if (!target) return;
    try {
      const { api, queue } = target;
      const [status, queued, running] = await Promise.all([
        api.jobs.getQueueStatus({ queue }),
        api.jobs.listJobs({ queue, state: JobState.QUEUED, pageSize: 100 }),
        api.jobs.listJobs({ queue, state: JobState.RUNNING, pageSize: 100 }),
      ]);
      if (target !== this.target) return;
      this.render(queue, status, [...running.jobs, ...queued.jobs], target.api);
    } catch (error) {
      replace(this.element, h("h2", {}, `Queue ${target.queue}`), h("p.error", {}, (error as Error).message));
    }
  }

  /** A row's image and command (ListJobs omits definitions: read once per job id, immutable). */
  private what(api: Api, queue: string, jobId: string): HTMLElement {
    const cell = h("span", {}, "…");
    let known = this.definitions.get(jobId);
    if (!known) {
      known = api.jobs.getJobDefinition({ jobId, queue }).then(
        ({ definition }) => {
          const image = definition?.image || (definition?.build ? "(Dockerfile build)" : "");
          return { image, command: definition?.command ?? "" };
        },
        () => ({ image: "", command: "" }),
      );
      this.definitions.set(jobId, known);
      if (this.definitions.size > 1000) this.definitions.delete(this.definitions.keys().next().value!);
    }
    void known.then(({ image, command }) => replace(cell, h("code", {}, image), command ? h("span.meta", {}, ` ${command}`) : ""));
    return cell;
  }

  private render(queue: string, status: GetQueueStatusResponse, jobs: Job[], api: Api): void {
    const slots = status.workers.reduce((n, w) => n + w.cpus, 0);
    this.summary = `${status.running} running · ${status.queued} queued · ${status.workers.length} worker${status.workers.length === 1 ? "" : "s"}`;
    this.onSummary(this.summary);
    replace(
      this.element,
      h("h2", {}, "Queue ", h("code", {}, queue)),
      h("p.counts", {}, `${status.queued} queued, ${status.running} running, ${status.finished} finished; ${slots} slot${slots === 1 ? "" : "s"} on ${status.workers.length} worker${status.workers.length === 1 ? "" : "s"}`),
      h("h3", {}, "Workers"),
      status.workers.length
        ? h(
            "table",
            {},
            h("thead", {}, h("tr", {}, ["Worker", "Slots", "GPUs", "Running", "Max duration"].map((c) => h("th", {}, c)))),
            h(
              "tbody",
              {},
              status.workers.map((w) =>
                h(
                  "tr",
                  {},
                  h("td", { title: `${w.hostname} ${w.version}` }, h("code", {}, w.id.slice(0, 12)), w.hostname ? ` ${w.hostname}` : ""),
                  h("td", {}, `${w.runningJobIds.length}/${w.cpus}`),
                  h("td", {}, w.gpus.length ? w.gpus.join(",") : "–"),
                  h("td", {}, w.runningJobIds.map((id) => h("button.link", { type: "button", onclick: () => this.open(id) }, id.slice(0, 8)))),
                  h("td", {}, w.maxJobDuration ? formatSeconds(seconds(w.maxJobDuration)) : ""),
                ),
              ),
            ),
          )
        : h("p.empty", {}, "No worker is connected to this queue. Start one: jobwire worker " + queue),
      h("h3", {}, "Waiting and running jobs"),
      jobs.length
        ? h(
            "table",
            {},
            h("thead", {}, h("tr", {}, ["Job", "Image and command", "State", "Since", h("span.visually-hidden", {}, "Actions")].map((c) => h("th", {}, c)))),
            h(
              "tbody",
              {},
              jobs.map((job) =>
                h(
                  "tr",
                  {},
                  h("td", {}, h("button.link", { type: "button", title: `Open job ${job.id}`, onclick: () => this.open(job.id) }, job.id.slice(0, 8))),
                  h("td.what", {}, this.what(api, queue, job.id)),
                  h("td", { title: job.waitingReason }, job.state === JobState.RUNNING ? "running" : "queued"),
                  h("td", {}, job.updateTime ? ago(timestampDate(job.updateTime)) : ""),
                  h("td", {}, h("button.small", { type: "button", "aria-label": `Cancel job ${job.id.slice(0, 8)} for everyone`, onclick: () => this.onCancel(queue, job.id) }, "Cancel…")),
                ),
              ),
            ),
          )
        : h("p.empty", {}, "Nothing waiting or running."),
    );
  }
}


function ago(date: Date): string {
  return `${formatSeconds(Math.max(0, (Date.now() - date.getTime()) / 1000))} ago`;
}
