// The transport: every HTTP call of the dashboard, and nothing else. Requests carry the HttpOnly session cookie
// (the browser adds it; no script can read it) and, for changes, the session's CSRF token.

export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

let csrf = { header: "X-CSRF-Token", token: null };
let onSignedOut = () => {};

// Called when an answer says the session has ended (signed out elsewhere, idle too long, key removed).
export function whenSignedOut(callback) {
  onSignedOut = callback;
}

export function useCsrf(header, token) {
  csrf = { header, token };
}

function headers(method, hasBody) {
  const out = { Accept: "application/json" };
  if (hasBody) out["Content-Type"] = "application/json";
  if (method !== "GET" && csrf.token) out[csrf.header] = csrf.token;
  return out;
}

async function send(method, path, body, signal) {
  try {
    return await fetch(path, {
      method,
      headers: headers(method, body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
      signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "unreachable", "The API cannot be reached.");
  }
}

async function failure(res) {
  const data = await res.json().catch(() => null);
  // Two shapes: ours ({error: "...", code}) and OpenAI's on the inference routes ({error: {message, code}}).
  const openai = typeof data?.error === "object" && data.error !== null ? data.error : null;
  const message = openai?.message ?? data?.error ?? `The API answered ${res.status} ${res.statusText}.`;
  const code = openai?.code ?? openai?.type ?? data?.code ?? "http_error";
  return new ApiError(res.status, code, message, data?.details ?? {});
}

export async function request(method, path, body) {
  const res = await send(method, path, body);
  if (res.status === 401 && csrf.token && !path.startsWith("/api/v1/session")) onSignedOut();
  if (!res.ok) throw await failure(res);
  return res.status === 204 ? null : res.json();
}

export const get = (path) => request("GET", path);
export const post = (path, body) => request("POST", path, body ?? {});

export const nodePath = (fp, rest = "") => `/api/v1/nodes/${encodeURIComponent(fp)}${rest}`;

// A streamed completion (`stream: true`): yields each `data:` chunk's JSON until `[DONE]` or the end.
export async function* stream(path, body, signal) {
  const res = await send("POST", path, body, signal);
  if (!res.ok) throw await failure(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.search(/\r\n\r\n|\n\n|\r\r/)) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + (buffer.startsWith("\r\n\r\n", cut) ? 4 : 2));
      const data = frame
        .split(/\r\n|\n|\r/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(0, chunk.error.code ?? "stream_error", chunk.error.message ?? "error");
      yield chunk;
    }
  }
}
