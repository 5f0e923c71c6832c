// The page's controller and its one state object. Data flows one way: the state (this App's
// fields: the URL's job, the job followed, the queue, errors…) changes, `update()` schedules one
// `Layout.render()` that redraws every view from it; views never change the state themselves,
// they send events up (`PageEvents`: edit, setQueue, run, cancel, …). The terminal is the one
// sink written directly (log text streams into it; its notices are state like the rest).

import { toJson } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { apiFor, resolveQueue, uploadBlob, type Api } from "./api";
import { assemble, jobId, runnable, toMessage, type DataRefJson, type DefinitionJson } from "./definition";
import { JobDefinitionSchema } from "./gen/jobwire/v1/definition_pb";
import { JobResultSchema, JobState, LogKind, type Job, type LogChunk } from "./gen/jobwire/v1/jobs_pb";
import { HashParams } from "./hashparams";
import type { Draft } from "./ui/editor";
import { Layout, type PageEvents } from "./ui/layout";
import { debounce } from "./ui/dom";
import { action, footer, type Action, type Footer } from "./ui/status";

/** Run ignores clicks this long after one (a double-click submits once). */
export const RUN_LOCK_MS = 600;
import { JobWatcher } from "./watcher";

const SHORT_PATH = /^\/j\/([0-9a-f]{64})\/?$/;

export type Finished = (job: Job, api: Api, outputs: Record<string, DataRefJson>) => void;

export class App implements PageEvents {
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
  /** A transient error (a failed submission, cancel, copy), shown until the next action. */
  error = "";
  /** Connection trouble of the job's stream (retrying), or "". */
  connection = "";
  /** The finished job's outputs, shown by the Outputs panel (a new object for each job). */
  outputs: { api?: Api; jobId: string; files: Record<string, DataRefJson> } = { jobId: "", files: {} };
  /** Bumped when the definition changed underneath the forms (URL, metaframe): they redraw. */
  formVersion = 0;
  /** Run ignores clicks until then (ms, `performance.now()`). */
  runLockedUntil = 0;
  /** The terminal dropped earlier lines of this job's log (its scrollback is bounded). */
  logsDropped = false;
  /** This server's own queue when it has a live worker (offered on a first visit). */
  serverQueue = "";
  private renderScheduled = false;
  readonly ui: Layout;

  constructor() {
    this.hash = new HashParams(location.hash);
    this.shortId = SHORT_PATH.exec(location.pathname)?.[1];
    this.readHash();
    this.ui = new Layout(this, this);
    window.addEventListener("hashchange", () => {
      this.hash = new HashParams(location.hash);
      this.readHash();
      this.dirty = true; // Run before the debounced refresh runs the job the URL now holds
      this.formVersion++;
      this.update();
      this.refresh();
    });
  }

  async start(): Promise<void> {
    if (this.shortId) await this.loadShort(this.shortId);
    this.formVersion++;
    this.update();
    await this.refreshNow();
    void this.offerServerQueue();
  }

  /** Redraw every view from the state, once per task however many changes came in it. */
  update(): void {
    if (this.renderScheduled) return;
    this.renderScheduled = true;
    queueMicrotask(() => {
      this.renderScheduled = false;
      this.ui.render();
    });
  }

  /** A page with no queue gets this server's own queue when a worker serves it. */
  private async offerServerQueue(): Promise<void> {
    try {
      const api = apiFor(location.origin);
      // Named only while a worker serves it (`jobwire up`'s local queue); a public server names none.
      const offered = (await api.server.getServerInfo({})).offeredQueue;
      if (!offered) return;
      this.serverQueue = offered;
      // A `/j/{id}` page learns its queue from the job; it is not rewritten on load.
      if (!this.target.queue && !this.shortId && !this.current) this.setQueue(offered);
      else this.update();
    } catch {
      // no such queue here, or the server is away: nothing to offer
    }
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
      this.error = `Job ${id} not found: ${ConnectError.from(error).rawMessage}`;
    }
  }

  // --- edits ------------------------------------------------------------------------

  /** The definition or a switch changed (called on every keystroke: everything here is cheap). */
  private changed(): void {
    this.dirty = true;
    this.update();
    this.writeHash();
    this.refresh();
  }

  /** A view's edit, applied to the state here (the views never change it themselves). */
  edit(change: (draft: Draft) => void): void {
    change({ job: this.job, hash: this.hash, textFiles: this.textFiles });
    this.hash.setJson("inputs", this.textFiles);
    this.changed();
  }

  setQueue(value: string): void {
    this.hash.set("queue", value.trim());
    this.hash.set("queueOverride", undefined);
    this.changed();
  }

  /** Replace the whole job (metaframe input `job` with `allowsetjob`). */
  setJob(job: DefinitionJson): void {
    this.job = job;
    this.formVersion++;
    this.changed();
  }

  setMetaframeInputs(inputs: Record<string, DataRefJson>): void {
    this.metaframeInputs = inputs;
    this.dirty = true;
    this.formVersion++;
    this.update();
    this.refresh();
  }

  private writeHash = debounce(() => {
    if (this.shortId) this.shortId = undefined; // edited: the URL now carries the job itself
    this.hash.setJson("job", this.job);
    // The URL always carries the queue, also when it came from the job (a `/j/{id}` page).
    if (!this.hash.get("queue") && !this.hash.get("queueOverride") && this.target.queue) this.hash.set("queue", this.target.queue);
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
    this.update();
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
    this.logsDropped = false;
    this.ui.terminal.clear();
    this.outputs = { jobId: "", files: {} };
    this.update();
    if (!id) return;
    const { api, queue } = this.target;
    this.watcher = new JobWatcher(api, id, queue, {
      job: (job) => this.onJob(job, api),
      logs: (kind, chunks, fresh) => this.onLogs(kind, chunks, fresh),
      missing: () => {
        this.current = undefined;
        this.ui.terminal.clear();
        this.ui.terminal.note("Not run yet: press Run, and the logs appear here live.");
        this.update();
      },
      connection: (problem) => {
        this.connection = problem ?? "";
        this.update();
      },
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
      // A `/j/{id}` page learns its queue from the job: the URL carries it from now on.
      this.hash.set("queue", job.queue);
      history.replaceState(history.state, "", `${location.pathname}${this.hash}`);
      for (const listener of this.hashListeners) listener();
    }
    this.update();
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
          this.update();
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
    this.outputs = { api, jobId: job.id, files: outputs };
    this.update();
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
    if (this.ui.terminal.dropped && !this.logsDropped) this.logsDropped = true;
    this.update();
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

  /** One submission per click, and none for the clicks of a double-click that follow it. */
  private lock(): boolean {
    const now = performance.now();
    if (now < this.runLockedUntil) return false;
    this.runLockedUntil = now + RUN_LOCK_MS;
    this.error = "";
    this.update();
    setTimeout(() => this.update(), RUN_LOCK_MS + 10);
    return true;
  }

  async run(): Promise<void> {
    if (this.lock()) await this.submit();
  }

  private async submit(): Promise<void> {
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
      this.showError(`Run failed: ${ConnectError.from(error).rawMessage}`);
    }
  }

  showError(message: string): void {
    this.error = message;
    this.update();
  }

  /** Cancel the job for this page's namespace (others who submitted it keep it). */
  async cancel(): Promise<void> {
    const { api, queue } = this.target;
    this.error = "";
    try {
      await api.jobs.cancelJob({ queue: this.current?.queue || queue, jobId: this.jobId, namespace: this.namespace });
    } catch (error) {
      this.showError(`Cancel failed: ${ConnectError.from(error).rawMessage}`);
    }
  }

  /** Cancel a queue's job for every namespace (the Queue panel asks first). */
  async cancelForEveryone(queue: string, jobId: string): Promise<void> {
    try {
      await this.target.api.jobs.cancelJob({ queue, jobId, namespace: "*" });
    } catch (error) {
      this.showError(`Cancel failed: ${ConnectError.from(error).rawMessage}`);
    }
  }

  async deleteAndRetry(): Promise<void> {
    if (!this.lock()) return;
    const { api, queue } = this.target;
    try {
      await api.jobs.deleteJob({ jobId: this.jobId, queue });
    } catch (error) {
      if (ConnectError.from(error).code !== Code.NotFound) {
        this.showError(`Delete failed: ${ConnectError.from(error).rawMessage}`);
        return;
      }
    }
    await this.submit();
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
