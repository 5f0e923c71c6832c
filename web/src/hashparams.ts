// The URL hash (`#?key=value&…`) is the page's whole configuration, read and written with the
// seed's encodings (seed-spec §10.1): JSON values are base64 of JSON (older writers: base64 of
// encodeURIComponent(JSON), still read), booleans are true iff "true".

/** The hash parameters the app itself reads; every other one becomes an env var of the job. */
export const APP_PARAMS = [
  "allowsetjob",
  "autostart",
  "config",
  "control",
  "debug",
  "definition",
  "ignoreQueueOverride",
  "inputs",
  "job",
  "maxJobDuration",
  "queue",
  "queueOverride",
  "resolverefs",
  "terminal",
] as const;

const PARENT_INJECTED = new Set(["channel", "CHANNEL", "readonly", "edit", "parent-metapage-id", "fs-path"]);

/** Keys a parent page (metapage) adds to the hash; never part of the job. */
export function isParentInjected(key: string): boolean {
  return PARENT_INJECTED.has(key) || /^mp[-_]/.test(key);
}

/** The hash parameters, in order, URI-decoded. A `+` stays a `+` (base64 needs it). */
export function parseHash(hash: string): Map<string, string> {
  const params = new Map<string, string>();
  let text = hash.startsWith("#") ? hash.slice(1) : hash;
  text = text.startsWith("?") ? text.slice(1) : text;
  for (const part of text.split("&")) {
    if (!part) continue;
    const eq = part.indexOf("=");
    const key = safeDecode(eq < 0 ? part : part.slice(0, eq));
    const value = eq < 0 ? "" : safeDecode(part.slice(eq + 1));
    if (key) params.set(key, value);
  }
  return params;
}

/** `#?k=v&…` with every key and value URI-encoded (base64's `+/=` included). */
export function formatHash(params: Map<string, string>): string {
  const parts = [...params].map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`);
  return parts.length ? `#?${parts.join("&")}` : "";
}

function safeDecode(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

/** Base64 (standard or URL-safe, padding optional) of UTF-8 bytes to text. */
export function base64ToText(value: string): string {
  return new TextDecoder().decode(base64ToBytes(value));
}

export function base64ToBytes(value: string): Uint8Array {
  let b64 = value.trim().replace(/ /g, "+").replace(/-/g, "+").replace(/_/g, "/");
  b64 += "=".repeat((4 - (b64.length % 4)) % 4);
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

export function bytesToBase64(bytes: Uint8Array): string {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

/** A JSON hash value: base64 of JSON, or of encodeURIComponent(JSON); undefined when unreadable. */
export function decodeJsonParam<T>(value: string | undefined): T | undefined {
  if (!value) return undefined;
  let text: string;
  try {
    text = base64ToText(value);
  } catch {
    text = value; // some writers put plain (URI-encoded) JSON in the hash
  }
  for (const candidate of [text, safeDecode(text), value]) {
    try {
      return JSON.parse(candidate) as T;
    } catch {
      // try the next reading
    }
  }
  return undefined;
}

/** base64 of the UTF-8 JSON of `value`. */
export function encodeJsonParam(value: unknown): string {
  return bytesToBase64(new TextEncoder().encode(JSON.stringify(value)));
}

/** Typed access to the hash: read on construction, written back with `history.replaceState`. */
export class HashParams {
  params: Map<string, string>;

  constructor(hash: string) {
    this.params = parseHash(hash);
  }

  get(key: string): string | undefined {
    return this.params.get(key);
  }

  bool(key: string): boolean {
    return this.params.get(key) === "true";
  }

  json<T>(key: string): T | undefined {
    return decodeJsonParam<T>(this.params.get(key));
  }

  set(key: string, value: string | undefined): void {
    if (value === undefined || value === "") this.params.delete(key);
    else this.params.set(key, value);
  }

  setBool(key: string, value: boolean): void {
    this.set(key, value ? "true" : undefined);
  }

  /** Stores `value` as base64 JSON; empty objects and undefined remove the key. */
  setJson(key: string, value: unknown): void {
    const empty = value === undefined || value === null || (typeof value === "object" && !Object.keys(value).length);
    this.set(key, empty ? undefined : encodeJsonParam(value));
  }

  /** Parameters that become env vars of the job: not the app's own, not parent-injected. */
  envParams(): Record<string, string> {
    const env: Record<string, string> = {};
    for (const [key, value] of this.params) {
      if (!(APP_PARAMS as readonly string[]).includes(key) && !isParentInjected(key)) env[key] = value;
    }
    return env;
  }

  toString(): string {
    return formatHash(this.params);
  }
}
