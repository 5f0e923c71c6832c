// Embedded in a metapage (an iframe), the page is a metaframe, as the seed's is: metaframe inputs
// become the job's input files, a finished job's output files become metaframe outputs.
//   - input `job` replaces the job when `allowsetjob` is set;
//   - other inputs: strings → utf8, serialized blobs / data URLs → bytes, DataRefs as they are,
//     other values → json; anything over 200 bytes is stored on the server (`key` ref);
//   - outputs: DataRefs (stored blobs as `<server>/f/<key>` URLs) or, with `resolverefs`, the data
//     itself; with `allowsetjob` also `job/result.json`.

import { Metaframe } from "@metapages/metapage";
import type { Api } from "./api";
import type { App } from "./app";
import type { DataRefJson, DefinitionJson } from "./definition";
import { FinishReason, LogKind, LogStream, type Job } from "./gen/jobwire/v1/jobs_pb";
import { base64ToBytes, bytesToBase64 } from "./hashparams";
import { seconds } from "./ui/status";

const INLINE_LIMIT = 200;

export function connectMetaframe(app: App): Metaframe {
  const metaframe = new Metaframe();
  let sentFor = "";
  // The parent metapage keeps each metaframe's URL: tell it about our own edits.
  app.onHashWritten(() => metaframe._onHashUrlChange(undefined));
  metaframe.onInputs(async (inputs: Record<string, unknown>) => {
    const all = await Metaframe.deserializeInputs({ ...metaframe.getInputs(), ...inputs });
    const refs: Record<string, DataRefJson> = {};
    for (const [name, value] of Object.entries(all)) {
      if (name === "job") {
        if (app.hash.bool("allowsetjob") && value && typeof value === "object") app.setJob(value as DefinitionJson);
        continue;
      }
      const ref = await toDataRef(app, value);
      if (ref) refs[name.replace(/^\/+/, "")] = ref;
    }
    app.setMetaframeInputs(refs);
  });
  app.onFinished(async (job, api, outputs) => {
    if (sentFor === job.id) return;
    sentFor = job.id;
    const values: Record<string, unknown> = {};
    const resolve = app.hash.bool("resolverefs");
    for (const [name, ref] of Object.entries(outputs)) values[name] = resolve ? await resolved(api, ref) : asUrlRef(api, ref);
    if (app.hash.bool("allowsetjob")) values["job/result.json"] = await resultSummary(app, job, api);
    await metaframe.setOutputs(resolve ? await Metaframe.serializeInputs(values) : values);
  });
  return metaframe;
}

async function toDataRef(app: App, value: unknown): Promise<DataRefJson | undefined> {
  if (value === null || value === undefined) return undefined;
  let ref: DataRefJson;
  if (typeof value === "string") {
    const dataUrl = /^data:[^,]*;base64,(.*)$/s.exec(value);
    ref = dataUrl ? { type: "base64", value: dataUrl[1] } : { type: "utf8", value };
  } else if (typeof value === "number" || typeof value === "boolean") {
    ref = { type: "utf8", value: String(value) };
  } else if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) {
    const bytes = value instanceof ArrayBuffer ? new Uint8Array(value) : new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
    ref = { type: "base64", value: bytesToBase64(bytes) };
  } else if (value instanceof Blob) {
    ref = { type: "base64", value: bytesToBase64(new Uint8Array(await value.arrayBuffer())) };
  } else if (isDataRef(value)) {
    ref = value;
  } else {
    ref = { type: "json", value: value as DataRefJson["value"] };
  }
  return storeIfLarge(app, ref);
}

function isDataRef(value: unknown): value is DataRefJson {
  const v = value as { type?: unknown; value?: unknown };
  return typeof v === "object" && typeof v.type === "string" && ["base64", "utf8", "json", "url", "key"].includes(v.type) && "value" in v;
}

async function storeIfLarge(app: App, ref: DataRefJson): Promise<DataRefJson> {
  if (ref.type !== "base64" && ref.type !== "utf8") return ref;
  const text = String(ref.value);
  if (text.length <= INLINE_LIMIT) return ref;
  const bytes = ref.type === "base64" ? base64ToBytes(text) : new TextEncoder().encode(text);
  return { type: "key", value: await app.upload(bytes) };
}

function asUrlRef(api: Api, ref: DataRefJson): DataRefJson {
  return ref.type === "key" ? { type: "url", value: `${api.origin}/f/${ref.value}` } : ref;
}

/** An output's data: text for utf8/json, bytes (serialized later) for the rest. */
async function resolved(api: Api, ref: DataRefJson): Promise<unknown> {
  switch (ref.type) {
    case "utf8":
    case undefined:
    case "json":
      return ref.value;
    case "base64":
      return base64ToBytes(String(ref.value)).buffer;
    case "key":
      return (await (await fetch(`${api.origin}/f/${ref.value}`)).blob()).arrayBuffer();
    case "url":
      return (await (await fetch(String(ref.value))).blob()).arrayBuffer();
    default:
      return ref.value;
  }
}

async function resultSummary(app: App, job: Job, api: Api): Promise<Record<string, unknown>> {
  const logs = await app.fullLogs(LogKind.RUN).catch(() => []);
  const lines = (stream: LogStream) => logs.filter((c) => c.stream === stream).map((c) => c.text.trimEnd());
  const result = job.result;
  return {
    stdout: lines(LogStream.STDOUT),
    stderr: lines(LogStream.STDERR),
    statusCode: result?.exitCode ?? null,
    error: result && result.reason !== FinishReason.SUCCESS ? result.message || FinishReason[result.reason] : null,
    duration: seconds(result?.duration) * 1000,
    isTimedOut: result?.reason === FinishReason.TIMED_OUT,
    url: `${api.origin}/q/${job.queue}/j/${job.id}`,
  };
}
