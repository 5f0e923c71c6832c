// The page's controller: the URL hash is the job; edits rewrite the URL, a debounced refresh
// recomputes the job id and follows that job; Run, Cancel and Delete-and-retry act on it.

import { toJson } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { apiFor, resolveQueue, uploadBlob, type Api } from "./api";
import { assemble, jobId, runnable, toMessage, type DataRefJson, type DefinitionJson } from "./definition";
import { JobDefinitionSchema } from "./gen/jobwire/v1/definition_pb";
import { JobResultSchema, JobState, LogKind, type Job, type LogChunk } from "./gen/jobwire/v1/jobs_pb";
import { HashParams } from "./hashparams";
import { Layout } from "./ui/layout";
import { debounce } from "./ui/dom";
import { action, footer, type Action, type Footer } from "./ui/status";
import { JobWatcher } from "./watcher";

const SHORT_PATH = /^\/j\/([0-9a-f]{64})\/?$/;

export type Finished = (job: Job, api: Api, outputs: Record<string, DataRefJson>) => void;

export class App {
  hash: HashParams;
  job: DefinitionJson = {};
  textFiles: Record<string, string> = {};
  metaframeInputs: Record<string, DataRefJson> = {};
  definition: DefinitionJson = {};
  jobId = "";
  current: Job | undefined;
  /** Opened as `/j/{id}` and not edited since: the URL stays short. */
  shortId: string | undefined;
  /** The queue the server reports for the job, used when the URL names none. */
  private jobQueue = "";
  private watcher: JobWatcher | undefined;
  private building = false;
  private finishedSeen = "";
  /** An edit not yet turned into a definition and id (the refresh is debounced). */
  private dirty = false;
  private reasonTimer: ReturnType<typeof setTimeout> | undefined;
  private finishedListeners: Finished[] = [];
  private hashListeners: (() => void)[] = [];
  readonly ui: Layout;

  constructor() {
    this.hash = new HashParams(location.hash);
    this.shortId = SHORT_PATH.exec(location.pathname)?.[1];
    this.readHash();
    this.ui = new Layout(this);
    window.addEventListener("hashchange", () => {
      this.hash = new HashParams(location.hash);
      this.readHash();
      this.ui.rerender();
      this.refresh();
    });
  }

  async start(): Promise<void> {
    if (this.shortId) await this.loadShort(this.shortId);
    this.ui.rerender();
    this.refreshNow();
  }

  /** Queue name and server origin, from `queueOverride`, `queue`, or the job itself. */
  get target(): { api: Api; queue: string } {
    const override = this.hash.get("queueOverride");
    const value = (override && !this.hash.bool("ignoreQueueOverride") ? override : this.hash.get("queue")) || this.jobQueue;
    const { origin, queue } = resolveQueue(value ?? "", location.origin);
    return { api: apiFor(origin), queue };
  }

  get namespace(): string {
    return this.hash.json<{ namespace?: string }>("control")?.namespace || "_";
  }

  onFinished(listener: Finished): void {
    this.finishedListeners.push(listener);
  }

  /** Called after the page rewrote its own URL (replaceState fires no hashchange). */
  onHashWritten(listener: () => void): void {
    this.hashListeners.push(listener);
  }

  private readHash(): void {
    const job = this.hash.json<DefinitionJson>("job");
    if (job || !this.shortId) this.job = job && typeof job === "object" ? job : {};
    const files = this.hash.json<Record<string, string>>("inputs");
    this.textFiles = files && typeof files === "object" ? files : {};
  }

  private async loadShort(id: string): Promise<void> {
    try {
      const { api, queue } = this.target;
      const response = await api.jobs.getJobDefinition({ jobId: id, queue });
      if (response.definition) this.job = toJson(JobDefinitionSchema, response.definition) as DefinitionJson;
    } catch (error) {
      this.ui.terminal.note(`Job ${id} not found: ${ConnectError.from(error).rawMessage}`);
    }
  }

  // --- edits ------------------------------------------------------------------------

  /** The definition or a switch changed (called on every keystroke: everything here is cheap). */
  changed(): void {
    this.dirty = true;
    this.ui.counts();
    this.writeHash();
    this.refresh();
  }

  textFilesChanged(): void {
    this.hash.setJson("inputs", this.textFiles);
    this.changed();
  }

  setQueue(value: string): void {
    this.hash.set("queue", value.trim());
    this.hash.set("queueOverride", undefined);
    this.changed();
    this.ui.queuePanel.setQueue(this.target.api, this.target.queue);
  }

  /** Replace the whole job (metaframe input `job` with `allowsetjob`). */
  setJob(job: DefinitionJson): void {
    this.job = job;
    this.ui.rerender();
    this.changed();
  }

  setMetaframeInputs(inputs: Record<string, DataRefJson>): void {
    this.metaframeInputs = inputs;
    this.dirty = true;
    this.ui.inputs.render();
    this.ui.counts();
    this.refresh();
  }

  private writeHash = debounce(() => {
    if (this.shortId) this.shortId = undefined; // edited: the URL now carries the job itself
    this.hash.setJson("job", this.job);
    history.replaceState(history.state, "", `/${this.hash}`);
    for (const listener of this.hashListeners) listener();
  }, 250);

  refresh = debounce(() => this.refreshNow(), 400);

  private async refreshNow(): Promise<void> {
    this.dirty = false;
    this.definition = assemble(this.job, {
      env: this.hash.envParams(),
      textFiles: this.textFiles,
      extraInputs: this.metaframeInputs,
    });
    const id = runnable(this.definition) ? await jobId(this.definition) : "";
    this.ui.counts();
    // The run followed is the job's run in the target queue: a new id or a new queue is a new watch.
    if (id !== this.jobId || !this.watcher || this.watcher.queue !== this.target.queue) this.follow(id);
    if (id && this.hash.bool("autostart") && !this.current) void this.run();
  }

  // --- following a job ---------------------------------------------------------------------

  private follow(id: string): void {
    this.watcher?.stop();
    this.watcher = undefined;
    this.jobId = id;
    this.current = undefined;
    this.building = false;
    this.ui.terminal.clear();
    this.ui.outputs.show(undefined, "", {});
    this.ui.showState();
    if (!id) return;
    const { api, queue } = this.target;
    this.watcher = new JobWatcher(api, id, queue, {
      job: (job) => this.onJob(job, api),
      logs: (kind, chunks, fresh) => this.onLogs(kind, chunks, fresh),
      missing: () => {
        this.current = undefined;
        this.ui.terminal.clear();
        this.ui.terminal.note("Not run yet: press Run, and the logs appear here live.");
        this.ui.showState();
      },
      connection: (problem) => this.ui.showConnection(problem),
    });
  }

  private onJob(job: Job, api: Api): void {
    if (job.state === JobState.QUEUED && !job.waitingReason && this.current?.state === JobState.QUEUED) {
      job.waitingReason = this.current.waitingReason; // WatchJob omits it; keep the last one read
    }
    this.current = job;
    this.followWaitingReason(job, api);
    if (!this.hash.get("queue") && !this.hash.get("queueOverride") && job.queue && job.queue !== this.jobQueue) {
      this.jobQueue = job.queue;
      this.ui.rerenderQueue();
    }
    this.ui.showState();
    void this.ui.queuePanel.refresh(); // the queue's counts changed with this job
    if (job.state === JobState.FINISHED && this.finishedSeen !== job.id + job.attempt) {
      this.finishedSeen = job.id + job.attempt;
      void this.finished(job, api);
    }
  }

  /** While queued, ask why now and then (workers come and go); WatchJob does not say. */
  private followWaitingReason(job: Job, api: Api): void {
    clearTimeout(this.reasonTimer);
    if (job.state !== JobState.QUEUED) return;
    this.reasonTimer = setTimeout(async () => {
      try {
        const fresh = (await api.jobs.getJob({ jobId: job.id, queue: this.target.queue })).job;
        if (fresh && this.current?.id === fresh.id && this.current.state === JobState.QUEUED) {
          this.current.waitingReason = fresh.waitingReason;
          this.ui.showState();
          this.followWaitingReason(this.current, api);
        }
      } catch {
        // the next state change tells more
      }
    }, job.waitingReason ? 5000 : 0);
  }

  private async finished(job: Job, api: Api): Promise<void> {
    let result = job.result;
    if (!result) result = (await api.jobs.getJobResult({ jobId: job.id, queue: this.target.queue })).result;
    const outputs = ((result && toJson(JobResultSchema, result) as { outputs?: Record<string, DataRefJson> })?.outputs) ?? {};
    if (job.id !== this.jobId) return;
    this.ui.outputs.show(api, job.id, outputs);
    this.ui.counts();
    if (Object.keys(outputs).length) this.ui.select("outputs", true);
    for (const listener of this.finishedListeners) listener(job, api, outputs);
  }

  private onLogs(kind: LogKind, chunks: LogChunk[], fresh: boolean): void {
    if (fresh) {
      this.ui.terminal.clear();
      this.building = false;
    }
    if (kind === LogKind.BUILD) {
      this.building = true;
      this.ui.terminal.writeBuild(chunks);
    } else {
      if (this.building && chunks.length) this.building = false;
      this.ui.terminal.writeRun(chunks);
    }
    this.ui.showState();
  }

  /** The footer's words for the current job. */
  state(): Footer {
    return footer(this.jobId, this.target.queue, this.current, this.building);
  }

  /** Which action the main button offers. */
  action(): Action {
    return action(this.jobId, this.target.queue, this.current);
  }

  // --- actions ---------------------------------------------------------------------

  async run(): Promise<void> {
    if (this.dirty) await this.refreshNow(); // Run right after an edit runs the edited job
    const { api, queue } = this.target;
    if (!queue || !this.jobId) return;
    try {
      const control = this.hash.json<Record<string, unknown>>("control") ?? {};
      const response = await api.jobs.submitJob({
        queue,
        definition: toMessage(this.definition),
        control: { namespace: this.namespace, ...(control as object) },
        id: this.jobId,
        debug: this.hash.bool("debug"),
      });
      if (this.hash.bool("debug")) console.debug("jobwire: submitted", response.jobId, this.definition);
      this.follow(response.jobId);
    } catch (error) {
      this.ui.showError(`Run failed: ${ConnectError.from(error).rawMessage}`);
    }
  }

  async cancel(): Promise<void> {
    const { api, queue } = this.target;
    try {
      await api.jobs.cancelJob({ queue: this.current?.queue || queue, jobId: this.jobId, namespace: this.namespace });
    } catch (error) {
      this.ui.showError(`Cancel failed: ${ConnectError.from(error).rawMessage}`);
    }
  }

  async deleteAndRetry(): Promise<void> {
    const { api, queue } = this.target;
    try {
      await api.jobs.deleteJob({ jobId: this.jobId, queue });
    } catch (error) {
      if (ConnectError.from(error).code !== Code.NotFound) {
        this.ui.showError(`Delete failed: ${ConnectError.from(error).rawMessage}`);
        return;
      }
    }
    await this.run();
  }

  /** Store bytes on the job's server by SHA-256. */
  upload(bytes: Uint8Array): Promise<string> {
    return uploadBlob(this.target.api, bytes);
  }

  /** The whole stored log of the current job (for copying), read page by page. */
  async fullLogs(kind: LogKind): Promise<LogChunk[]> {
    const { api, queue } = this.target;
    const chunks: LogChunk[] = [];
    let since = 0n;
    for (;;) {
      const page = await api.jobs.getJobLogs({ jobId: this.jobId, queue, kind, since });
      chunks.push(...page.chunks);
      if (!page.chunks.length || page.nextCursor === since) return chunks;
      since = page.nextCursor;
    }
  }
}
