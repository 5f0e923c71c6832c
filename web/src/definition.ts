// Job definitions as the URL carries them, assembled into what is submitted, and their id:
// the SHA-256 of the seed's canonical JSON (seed-spec §3), as the server computes it.

import { fromJson, toJson, type JsonValue } from "@bufbuild/protobuf";
import { JobDefinitionSchema, type JobDefinition } from "./gen/jobwire/v1/definition_pb";
import { isParentInjected } from "./hashparams";
import { sha256Hex } from "./sha256";

/** A data ref in its JSON form: `{type, value}` (seed-compatible). */
export interface DataRefJson {
  type?: string;
  value: JsonValue;
  hash?: string;
}

/** The job definition in its JSON form (the seed's `DockerJobDefinition`). */
export interface DefinitionJson {
  v?: number;
  image?: string;
  build?: {
    context?: string;
    buildContext?: string;
    filename?: string;
    target?: string;
    dockerfile?: string;
    buildArgs?: string[];
    platform?: string;
  };
  command?: string;
  entrypoint?: string;
  env?: Record<string, string>;
  workdir?: string;
  shmSize?: string;
  inputs?: Record<string, DataRefJson>;
  configFiles?: Record<string, DataRefJson>;
  maxDuration?: string;
  tags?: string[];
  requirements?: { cpus?: number; gpus?: number; maxDuration?: string; memory?: string };
}

/** What goes into a definition besides the `job` hash parameter. */
export interface Assembly {
  /** Hash params that become env vars (and `${key}` substitutions). */
  env: Record<string, string>;
  /** The `inputs` hash parameter: editable text files, sent as utf8 configFiles. */
  textFiles: Record<string, string>;
  /** Files from the metaframe's inputs, already data refs. */
  extraInputs: Record<string, DataRefJson>;
}

/** True when the definition can run: an image or a build. */
export function runnable(job: DefinitionJson): boolean {
  return Boolean(job.image?.trim() || job.build?.dockerfile?.trim() || job.build?.context?.trim());
}

/** The submitted definition: `job` plus env from the hash, text files, metaframe inputs. */
export function assemble(job: DefinitionJson, parts: Assembly): DefinitionJson {
  const definition: DefinitionJson = structuredClone(job);
  if (Object.keys(parts.env).length) {
    definition.env = { ...definition.env, ...parts.env };
    for (const [key, value] of Object.entries(parts.env)) {
      // Like the seed: the first `${key}` only, in the command and the build context.
      if (definition.command) definition.command = definition.command.replace("${" + key + "}", value);
      if (definition.build?.context) definition.build.context = definition.build.context.replace("${" + key + "}", value);
    }
  }
  if (Object.keys(parts.textFiles).length) {
    definition.configFiles = { ...definition.configFiles };
    for (const [name, text] of Object.entries(parts.textFiles)) {
      definition.configFiles[name] = { type: "utf8", value: text };
    }
  }
  if (Object.keys(parts.extraInputs).length) {
    definition.inputs = { ...definition.inputs, ...parts.extraInputs };
  }
  return definition;
}

/** The definition as a proto message (unknown fields dropped). */
export function toMessage(definition: DefinitionJson): JobDefinition {
  return fromJson(JobDefinitionSchema, definition as unknown as JsonValue, { ignoreUnknownFields: true });
}

const SCALARS = ["v", "image", "command", "entrypoint", "workdir", "shmSize", "maxDuration", "tags"] as const;
const BUILD = ["context", "buildContext", "filename", "target", "dockerfile", "buildArgs", "platform"];
const REQUIREMENTS = ["cpus", "gpus", "maxDuration", "memory"];

/** The job id: the same definition gives the same id here, on the server and in the seed. */
export async function jobId(definition: DefinitionJson): Promise<string> {
  // Through the proto first, so the id is computed on exactly what the server will see.
  const source = toJson(JobDefinitionSchema, toMessage(definition)) as Record<string, any>;
  const blob: Record<string, unknown> = {};
  for (const key of SCALARS) if (source[key] != null) blob[key] = source[key];
  for (const [name, fields] of [["build", BUILD], ["requirements", REQUIREMENTS]] as const) {
    const part = pick(source[name] ?? {}, fields);
    if (Object.keys(part).length) blob[name] = part;
  }
  const env = Object.fromEntries(Object.entries(source.env ?? {}).filter(([k]) => !isParentInjected(k)));
  if (Object.keys(env).length) blob.env = env;
  for (const name of ["inputs", "configFiles"]) {
    const refs = Object.entries((source[name] ?? {}) as Record<string, DataRefJson>);
    if (refs.length) blob[name] = Object.fromEntries(refs.map(([path, ref]) => [path, hashedRef(ref)]));
  }
  return sha256Hex(canonicalJson(blob));
}

function pick(source: Record<string, unknown>, fields: readonly string[]): Record<string, unknown> {
  return Object.fromEntries(Object.entries(source).filter(([k, v]) => fields.includes(k) && v != null));
}

function hashedRef(ref: DataRefJson): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  if (ref.value != null) out.value = ref.value;
  if (ref.type != null) out.type = ref.type;
  if (ref.type === "url" && typeof ref.value === "string") {
    const url = ref.value;
    if (url.includes("/presignedurl/")) out.value = url.split("/presignedurl/")[0];
    else if (url.startsWith("https://metaframe-asman-test.s3.us-west-1.amazonaws.com")) out.value = url.split(/[?#]/)[0];
  }
  return out;
}

/** JSON with keys sorted (UTF-16 order) at every level and no whitespace: safe-stable-stringify. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const entries = Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== undefined);
    entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(",")}}`;
  }
  return JSON.stringify(value) ?? "null";
}
