// Follows one job over WatchJob (a server stream): state changes and log batches, reconnecting
// after network blips from the last log index seen, so no chunk is shown twice or lost.

import { Code, ConnectError } from "@connectrpc/connect";
import type { Api } from "./api";
import { JobState, LogKind, type Job, type LogChunk } from "./gen/jobwire/v1/jobs_pb";

export interface WatchEvents {
  job(job: Job): void;
  /** New chunks of the run or build log; `fresh` means a new attempt started (clear the view). */
  logs(kind: LogKind, chunks: LogChunk[], fresh: boolean): void;
  /** The server does not know the job (never submitted, or deleted). */
  missing(): void;
  /** Connection trouble (retrying) or its end (`undefined`). */
  connection(problem: string | undefined): void;
}

export class JobWatcher {
  private abort = new AbortController();
  private attempt = -1;
  private next: Record<number, number> = { [LogKind.RUN]: 0, [LogKind.BUILD]: 0 };

  constructor(
    private api: Api,
    readonly jobId: string,
    /** The queue whose run of the job is followed; "" follows what the job's URL shows (no queue). */
    readonly queue: string,
    private events: WatchEvents,
  ) {
    void this.run();
  }

  stop(): void {
    this.abort.abort();
  }

  get stopped(): boolean {
    return this.abort.signal.aborted;
  }

  private async run(): Promise<void> {
    let delay = 500;
    while (!this.stopped) {
      try {
        const finished = await this.follow();
        this.events.connection(undefined);
        if (finished) return;
        delay = 500; // the stream ended without a final state: follow again at once
      } catch (error) {
        if (this.stopped) return;
        const problem = ConnectError.from(error);
        if (problem.code === Code.NotFound) {
          this.events.connection(undefined);
          this.events.missing();
          return;
        }
        this.events.connection(`reconnecting: ${problem.rawMessage || problem.message}`);
        await sleep(delay, this.abort.signal);
        delay = Math.min(delay * 2, 10_000);
      }
    }
  }

  /** One WatchJob call; true when the job finished. */
  private async follow(): Promise<boolean> {
    let finished = false;
    const request = { jobId: this.jobId, queue: this.queue, runLogsSince: BigInt(this.next[LogKind.RUN]), buildLogs: true };
    for await (const message of this.api.jobs.watchJob(request, { signal: this.abort.signal })) {
      this.events.connection(undefined);
      if (message.event.case === "job") {
        const job = message.event.value;
        finished = job.state === JobState.FINISHED;
        this.events.job(job);
      } else if (message.event.case === "logs") {
        const batch = message.event.value;
        const fresh = batch.attempt !== this.attempt;
        if (fresh) {
          this.attempt = batch.attempt;
          this.next = { [LogKind.RUN]: 0, [LogKind.BUILD]: 0 };
        }
        const kind = batch.kind === LogKind.BUILD ? LogKind.BUILD : LogKind.RUN;
        const start = Number(batch.start);
        const skip = Math.max(0, this.next[kind] - start);
        if (skip < batch.chunks.length || fresh) this.events.logs(kind, batch.chunks.slice(skip), fresh);
        this.next[kind] = Math.max(this.next[kind], start + batch.chunks.length);
      }
    }
    return finished;
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}
