// The server as the page sees it: gRPC-Web clients (unary and server-streaming RPCs only;
// browsers cannot do bidi) through Envoy, plus the two raw-bytes REST routes gRPC-Web cannot
// carry well: `PUT /f/{key}` (a client stream) and output downloads.

import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { FileService } from "./gen/jobwire/v1/files_pb";
import { JobService } from "./gen/jobwire/v1/jobs_pb";
import { ServerService } from "./gen/jobwire/v1/server_pb";
import { sha256Hex } from "./sha256";

export interface Api {
  /** Origin of the server's REST and gRPC-Web routes, e.g. `http://localhost:8080`. */
  origin: string;
  jobs: Client<typeof JobService>;
  files: Client<typeof FileService>;
  server: Client<typeof ServerService>;
}

const apis = new Map<string, Api>();

/**
 * Unary calls retried (twice, briefly) when the request never got an answer: browsers fail
 * in-flight requests when the machine's network changes (ERR_NETWORK_CHANGED, e.g. when Docker
 * adds a container's interface). Every unary RPC the page makes is idempotent (a submission of
 * the same definition is the same job). Streams reconnect on their own (watcher.ts).
 */
const retryUnary: Interceptor = (next) => async (request) => {
  for (let attempt = 0; ; attempt++) {
    try {
      return await next(request);
    } catch (error) {
      const problem = ConnectError.from(error);
      const network = problem.code === Code.Unavailable || /fetch|network/i.test(problem.rawMessage);
      if (request.stream || !network || attempt >= 2 || request.signal.aborted) throw error;
      await new Promise((resolve) => setTimeout(resolve, 300 * (attempt + 1)));
    }
  }
};

/** The clients for one server origin (cached: one transport per origin). */
export function apiFor(origin: string): Api {
  let api = apis.get(origin);
  if (!api) {
    const transport = createGrpcWebTransport({ baseUrl: origin, useBinaryFormat: true, interceptors: [retryUnary] });
    api = {
      origin,
      jobs: createClient(JobService, transport),
      files: createClient(FileService, transport),
      server: createClient(ServerService, transport),
    };
    apis.set(origin, api);
  }
  return api;
}

/**
 * Where a `queue` hash value points: a plain name is a queue on this page's server; a full
 * `http(s)://host/…/name` URL is the queue `name` on that server.
 */
export function resolveQueue(value: string, pageOrigin: string): { origin: string; queue: string } {
  if (/^https?:\/\//.test(value)) {
    const url = new URL(value);
    const queue = url.pathname.split("/").filter(Boolean).pop() ?? "";
    return { origin: url.origin, queue: decodeURIComponent(queue) };
  }
  return { origin: pageOrigin, queue: value };
}

/** Stores bytes under their SHA-256 (`PUT /f/{sha}`) unless already there; returns the key. */
export async function uploadBlob(api: Api, bytes: Uint8Array): Promise<string> {
  const key = await sha256Hex(bytes);
  const exists = await fetch(`${api.origin}/f/${key}/exists`);
  if (exists.ok) return key;
  const put = await fetch(`${api.origin}/f/${key}`, {
    method: "PUT",
    body: bytes as BodyInit,
    headers: { "content-type": "application/octet-stream" },
  });
  if (!put.ok) throw new Error(`upload failed: ${put.status} ${await put.text()}`);
  return key;
}

/** The bytes of one output of a finished job. */
export async function fetchOutput(api: Api, jobId: string, path: string): Promise<Blob> {
  const encoded = path.split("/").map(encodeURIComponent).join("/");
  const response = await fetch(`${api.origin}/j/${jobId}/outputs/${encoded}`);
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
  return response.blob();
}

/** The bytes of a stored blob. */
export async function fetchBlob(api: Api, key: string): Promise<Blob> {
  const response = await fetch(`${api.origin}/f/${encodeURIComponent(key)}`);
  if (!response.ok) throw new Error(`${key}: ${response.status}`);
  return response.blob();
}
