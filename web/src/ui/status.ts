// A job's state in words: queued and why it waits, running where, finished how.

import type { Duration } from "@bufbuild/protobuf/wkt";
import { FinishReason, JobState, type Job } from "../gen/jobwire/v1/jobs_pb";
import { formatSeconds } from "./dom";

export type Tone = "idle" | "busy" | "ok" | "warn" | "bad";

export interface Described {
  text: string;
  detail: string;
  tone: Tone;
}

export function seconds(duration: Duration | undefined): number {
  return duration ? Number(duration.seconds) + duration.nanos / 1e9 : 0;
}

/** What the footer says about a job. `building`: build or pull logs arrived, no run log yet. */
export function describe(job: Job, building: boolean): Described {
  switch (job.state) {
    case JobState.QUEUED:
      return { text: "Queued", detail: job.waitingReason || "waiting for a worker", tone: "busy" };
    case JobState.RUNNING: {
      const where = job.workerId ? `on worker ${job.workerId}` : "on a worker";
      const attempt = job.attempt > 1 ? ` (attempt ${job.attempt})` : "";
      return { text: building ? "Preparing image" : "Running", detail: `${where}${attempt}`, tone: "busy" };
    }
    case JobState.FINISHED:
      return finished(job);
    default:
      return { text: "Unknown state", detail: "", tone: "idle" };
  }
}

function finished(job: Job): Described {
  const result = job.result;
  const reason = result?.reason ?? job.finishReason;
  const took = result?.duration ? ` in ${formatSeconds(seconds(result.duration))}` : "";
  const message = result?.message ?? "";
  switch (reason) {
    case FinishReason.SUCCESS: {
      const code = result?.exitCode ?? 0;
      const oom = result?.oomKilled ? " (out of memory)" : "";
      return {
        text: code === 0 ? "Finished" : `Finished with exit code ${code}`,
        detail: `exit code ${code}${took}${oom}${job.workerId ? ` on worker ${job.workerId}` : ""}`,
        tone: code === 0 ? "ok" : "warn",
      };
    }
    case FinishReason.ERROR:
      return { text: "Failed", detail: message || "the job could not run", tone: "bad" };
    case FinishReason.TIMED_OUT:
      return { text: "Timed out", detail: message || `killed at its time limit${took}`, tone: "bad" };
    case FinishReason.CANCELLED:
      return { text: "Cancelled", detail: message || "cancelled by a client", tone: "idle" };
    case FinishReason.WORKER_LOST:
      return { text: "Worker lost", detail: message || "its worker disappeared", tone: "bad" };
    case FinishReason.REPLACED_BY_CLIENT:
      return { text: "Replaced", detail: message || "a newer job replaced it", tone: "idle" };
    case FinishReason.DELETED:
      return { text: "Deleted", detail: message || "deleted by a client", tone: "idle" };
    case FinishReason.EXPIRED:
      return { text: "Expired", detail: message || "no worker took it in time", tone: "idle" };
    default:
      return { text: "Finished", detail: message, tone: "idle" };
  }
}

/** True when a finished job's result answers identical submissions (so Run would not re-run it). */
export function cachedResult(job: Job): boolean {
  const reason = job.result?.reason ?? job.finishReason;
  return (
    job.state === JobState.FINISHED &&
    [FinishReason.SUCCESS, FinishReason.ERROR, FinishReason.TIMED_OUT].includes(reason)
  );
}

export interface Footer extends Described {
  /** `none` before the job exists, else the job state's name (`queued`, `running`, `finished`). */
  state: string;
}

/** What the footer says: no job, no queue, not run yet, or the job's state in words. */
export function footer(jobId: string, queue: string, job: Job | undefined, building: boolean): Footer {
  if (!jobId) return { text: "No job", detail: "Set an image or a build to run.", tone: "idle", state: "none" };
  // A job URL without a queue still shows its job (the run its id shows: a job id names no queue).
  if (job) return { ...describe(job, building), state: JobState[job.state].toLowerCase() };
  if (!queue) return { text: "No queue", detail: "Choose a queue to run on.", tone: "idle", state: "none" };
  return { text: "Not run yet", detail: "Press Run.", tone: "idle", state: "none" };
}

export type Action = "run" | "cancel" | "retry" | "none";

/** The main button: Run, Cancel while queued or running, Delete & retry once a result is cached. */
export function action(jobId: string, queue: string, job: Job | undefined): Action {
  if (!jobId || !queue) return "none";
  if (!job) return "run";
  if (job.state === JobState.QUEUED || job.state === JobState.RUNNING) return "cancel";
  return cachedResult(job) ? "retry" : "run";
}
