// The dashboard's one store, after remote-model-control.txt's `useNodeStore`: a cached model list per node, an
// "operating" flag per node while its load or unload runs, an optimistic unload rolled back if the server refuses,
// and, on every `distributed-pool-changed` event, a refresh of the affected node's list and of the pool. It never
// polls: the one EventSource on /api/v1/events is what tells it something changed. Its `model-usage` events (a
// node's generations in flight and queued, tokens, last use, at most one a second while prompts run) are applied
// to the per-node cache as they come, with no request: a refresh per update would be a node job per second per
// open page. Views only render `state`.

import { ApiError, get, nodePath, post, request, useCsrf, whenSignedOut } from "./api.js";

const LOG_LIMIT = 200;
const RECONNECT_MAX_MS = 10_000;

const initial = () => ({
  phase: "starting", // starting | signed-out | ready
  session: null, // { scope, canOperate, csrfToken, ... }
  connection: "connecting", // connecting | live | reconnecting
  lastEventId: null,
  nodes: {}, // fingerprint -> the node's record (`/api/v1/nodes` shape), plus `offlineSince`
  remoteModels: {}, // fingerprint -> [model records]: the reference's per-node cache
  memory: {}, // fingerprint -> the node's memory figures from its catalog
  files: {}, // fingerprint -> [model files with their estimates]
  operating: {}, // fingerprint -> what runs there now ("Loading tiny-a"), absent when idle
  notices: {}, // fingerprint -> { kind: "error" | "ok", text }: the outcome of the last operation there
  pool: { models: [], errors: [], fetched: false },
  poolOperating: null, // the model a pool-wide load is placing
  poolNotice: null,
  log: [], // newest first: { id, at, type, node, name, text, kind }
});

export const state = initial();
const listeners = new Set();
let scheduled = false;

export function subscribe(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

function changed() {
  if (scheduled) return;
  scheduled = true;
  queueMicrotask(() => {
    scheduled = false;
    for (const listener of listeners) listener(state);
  });
}

// Selectors, named as the reference names them.
export const useRemoteModels = (fp) => state.remoteModels[fp] ?? [];
export const useAllRemoteModels = () => state.remoteModels;
export const useIsRemoteModelOperating = (fp) => Boolean(state.operating[fp]);
export const canOperate = () => Boolean(state.session?.canOperate);

// ---- Session -------------------------------------------------------------------------------------------------

export async function start() {
  try {
    adopt(await get("/api/v1/session"));
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      state.phase = "signed-out";
      changed();
      return;
    }
    throw err;
  }
}

export async function signIn(key) {
  adopt(await post("/api/v1/session", { key }));
}

export async function signOut() {
  disconnect();
  try {
    await request("DELETE", "/api/v1/session");
  } finally {
    signedOut();
  }
}

function adopt(session) {
  useCsrf(session.csrfHeader, session.csrfToken);
  Object.assign(state, initial(), { session, phase: "ready" });
  changed();
  connect();
}

function signedOut() {
  disconnect();
  useCsrf("X-CSRF-Token", null);
  Object.assign(state, initial(), { phase: "signed-out" });
  changed();
}

whenSignedOut(signedOut);

async function sessionEnded() {
  try {
    await get("/api/v1/session");
    return false;
  } catch (err) {
    return err instanceof ApiError && err.status === 401;
  }
}

// ---- Per-node cache ------------------------------------------------------------------------------------------

// Unloads sent and not yet answered: fingerprint -> Map(modelId -> the record removed optimistically). A refresh
// that lands meanwhile must not bring the model back before the server has answered.
const pendingUnloads = {};

function withoutPending(fp, models) {
  const pending = pendingUnloads[fp];
  return pending ? models.filter((m) => !pending.has(m.id)) : models;
}

// One request at a time per key; a call while one is in flight makes it run once more afterwards, so the last
// answer applied always comes from a request sent after the last event (never an older, slower one).
const flights = new Map();

function singleFlight(key, run) {
  const flight = flights.get(key);
  if (flight) {
    flight.again = true;
    return flight.done;
  }
  const entry = { again: false };
  entry.done = (async () => {
    try {
      do {
        entry.again = false;
        await run();
      } while (entry.again);
    } finally {
      flights.delete(key);
    }
  })();
  flights.set(key, entry);
  return entry.done;
}

// The reference's fetchRemoteModels: the node's list. It reads the node's catalog, which holds the same list plus
// the node's memory and files, so the memory bar and the load dialog are refreshed by the same round trip.
export function fetchRemoteModels(fp) {
  return singleFlight(`node:${fp}`, async () => {
    try {
      const catalog = await get(nodePath(fp, "/catalog"));
      state.remoteModels[fp] = withoutPending(fp, catalog.models);
      state.memory[fp] = catalog.memory;
      state.files[fp] = catalog.files;
    } catch (err) {
      // An offline node keeps its last known list (shown greyed); anything else is worth saying.
      if (!(err instanceof ApiError && ["node_offline", "node_went_offline"].includes(err.code))) {
        state.notices[fp] = { kind: "error", text: err.message };
      }
    }
    changed();
  });
}

function fetchNode(fp) {
  return singleFlight(`record:${fp}`, async () => {
    try {
      const node = await get(nodePath(fp));
      setNode(node);
    } catch {
      // the event already said what matters (online or offline); the record's details can wait for the next one
    }
    changed();
  });
}

export function fetchPool() {
  return singleFlight("pool", async () => {
    try {
      const answer = await get("/v1/models");
      state.pool = { models: answer.data, errors: answer.errors ?? [], fetched: true };
    } catch (err) {
      state.pool = { ...state.pool, errors: [{ node_name: "pool", error: err.message }], fetched: true };
    }
    changed();
  });
}

function setNode(node) {
  const known = state.nodes[node.fingerprint];
  const offlineSince = node.online ? null : (known?.offlineSince ?? node.lastHeartbeat ?? null);
  state.nodes[node.fingerprint] = { ...node, offlineSince };
}

// ---- Actions -------------------------------------------------------------------------------------------------

async function operate(fp, what, run) {
  state.operating[fp] = what;
  delete state.notices[fp];
  changed();
  try {
    const notice = await run();
    if (notice) state.notices[fp] = { kind: "ok", text: notice };
  } catch (err) {
    state.notices[fp] = { kind: "error", text: err.message };
  } finally {
    delete state.operating[fp];
    changed();
    fetchRemoteModels(fp);
  }
}

export function loadModelOnNode(fp, { modelId, modelPath, contextLength, gpuLayers }) {
  const body = { modelId };
  if (modelPath) body.modelPath = modelPath;
  if (contextLength) body.contextLength = contextLength;
  if (gpuLayers !== undefined && gpuLayers !== null) body.gpuLayers = gpuLayers;
  return operate(fp, `Loading ${modelId}`, async () => {
    const result = await post(nodePath(fp, "/models/load"), body);
    const evicted = result.evicted?.length ? ` (evicted ${result.evicted.join(", ")})` : "";
    return result.alreadyLoaded ? `${modelId} was already loaded.` : `Loaded ${modelId} in ${result.loadSeconds}s${evicted}.`;
  });
}

export function unloadModelOnNode(fp, modelId) {
  const models = state.remoteModels[fp] ?? [];
  const index = models.findIndex((m) => m.id === modelId);
  const removed = index >= 0 ? models[index] : null;
  (pendingUnloads[fp] ??= new Map()).set(modelId, removed);
  state.remoteModels[fp] = models.filter((m) => m.id !== modelId); // optimistic
  return operate(fp, `Unloading ${modelId}`, async () => {
    try {
      await post(nodePath(fp, "/models/unload"), { modelId });
      return `Unloaded ${modelId}.`;
    } catch (err) {
      // Roll back: the model is still there as far as we know (the refresh that follows says for sure).
      const current = state.remoteModels[fp] ?? [];
      if (removed && !current.some((m) => m.id === modelId)) {
        const restored = [...current];
        restored.splice(Math.min(index, restored.length), 0, removed);
        state.remoteModels[fp] = restored;
      }
      throw new ApiError(err.status, err.code, `Could not unload ${modelId}: ${err.message}`);
    } finally {
      pendingUnloads[fp].delete(modelId);
    }
  });
}

export function unloadAllOnNode(fp) {
  return operate(fp, "Unloading every model", async () => {
    const result = await post(nodePath(fp, "/models/unload-all"));
    if (result.errors?.length) {
      throw new ApiError(0, "partial", result.errors.map((e) => `${e.modelId}: ${e.error}`).join("; "));
    }
    return result.unloaded.length ? `Unloaded ${result.unloaded.join(", ")}.` : "Nothing was loaded.";
  });
}

export async function poolLoad(modelName) {
  state.poolOperating = modelName;
  state.poolNotice = null;
  changed();
  try {
    const result = await post("/v1/models/load", { model_name: modelName });
    state.poolNotice = { kind: "ok", text: result.message };
  } catch (err) {
    state.poolNotice = { kind: "error", text: `Could not load ${modelName}: ${err.message}` };
  } finally {
    state.poolOperating = null;
    changed();
    fetchPool();
  }
}

export function dismissNotice(fp) {
  if (fp === null) state.poolNotice = null;
  else delete state.notices[fp];
  changed();
}

// ---- Live events ---------------------------------------------------------------------------------------------

let source = null;
let retryTimer = null;
let retryDelay = 1000;

function connect() {
  disconnect();
  const query = state.lastEventId ? `?lastEventId=${encodeURIComponent(state.lastEventId)}` : "";
  source = new EventSource(`/api/v1/events${query}`);
  source.addEventListener("open", () => {
    retryDelay = 1000;
    if (state.connection === "reconnecting") {
      const from = state.lastEventId ? ` after event ${state.lastEventId}` : "";
      record({ at: new Date().toISOString(), type: "reconnected", text: `Stream resumed${from}` });
    }
    state.connection = "live";
    changed();
  });
  source.addEventListener("snapshot", (e) => onSnapshot(e));
  source.addEventListener("distributed-pool-changed", (e) => onChange(e));
  source.addEventListener("model-usage", (e) => onUsage(e));
  source.addEventListener("error", () => onError());
}

function disconnect() {
  clearTimeout(retryTimer);
  if (source) source.close();
  source = null;
}

async function onError() {
  state.connection = "reconnecting";
  changed();
  // While CONNECTING the browser retries by itself, sending Last-Event-ID. CLOSED means it gave up (the API
  // answered with an error while restarting): open a new stream that resumes after the last event we saw.
  if (!source || source.readyState !== EventSource.CLOSED) return;
  const failed = source;
  if (await sessionEnded()) {
    signedOut();
    return;
  }
  if (source !== failed) return;
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, retryDelay);
  retryDelay = Math.min(retryDelay * 2, RECONNECT_MAX_MS);
}

function onSnapshot(e) {
  const snapshot = JSON.parse(e.data);
  state.lastEventId = e.lastEventId || state.lastEventId;
  const seen = new Set();
  for (const { models, ...node } of snapshot.nodes) {
    seen.add(node.fingerprint);
    setNode(node);
    state.remoteModels[node.fingerprint] = withoutPending(node.fingerprint, models);
  }
  for (const fp of Object.keys(state.nodes)) if (!seen.has(fp)) delete state.nodes[fp];
  record({ id: e.lastEventId, at: snapshot.at, type: "snapshot", text: `Snapshot: ${snapshot.nodes.length} nodes` });
  for (const fp of seen) if (state.nodes[fp].online) fetchRemoteModels(fp);
  fetchPool();
  changed();
}

function onChange(e) {
  const event = JSON.parse(e.data);
  state.lastEventId = e.lastEventId;
  const fp = event.node;
  const name = state.nodes[fp]?.name ?? event.name ?? fp.slice(0, 8);
  if (event.type.startsWith("model-")) {
    applyModel(fp, event.model);
    // why a model left: an operator's unload, its keep-alive, an eviction, its file written over...
    const gone = event.type.startsWith("model-unload") && event.model?.unloadReason;
    const reason = event.error ? `: ${event.error}` : gone ? ` (${event.model.unloadReason.replaceAll("-", " ")})` : "";
    record({ id: e.lastEventId, at: event.at, type: event.type, node: fp, name, text: `${event.modelId}${reason}` });
    fetchRemoteModels(fp);
  } else {
    const node = state.nodes[fp];
    if (node) {
      node.online = event.state === "online";
      node.offlineSince = node.online ? null : event.at;
    }
    const why = event.reason ? ` (${event.reason.replace("-", " ")})` : "";
    record({ id: e.lastEventId, at: event.at, type: event.type, node: fp, name, text: `${event.state}${why}` });
    fetchNode(fp);
    if (event.state === "online") fetchRemoteModels(fp);
  }
  fetchPool();
  changed();
}

// A node's usage now: merged into the models the cache holds (a model it does not hold yet arrives with its own
// event). No id (not part of the history), so `lastEventId` stays where it is; not logged (a gauge, not an event).
function onUsage(e) {
  const usage = JSON.parse(e.data);
  const models = state.remoteModels[usage.node];
  if (!models) return;
  const byId = new Map(usage.models.map((u) => [u.modelId, u]));
  state.remoteModels[usage.node] = models.map((m) => {
    const u = byId.get(m.id);
    return u ? { ...m, inFlight: u.inFlight, queued: u.queued, tokensGenerated: u.tokensGenerated, lastUsed: u.lastUsed } : m;
  });
  changed();
}

// The event carries the model's record after the change: show it at once, before the refresh confirms it.
function applyModel(fp, model) {
  const models = state.remoteModels[fp] ?? [];
  const gone = model.state === "unloaded";
  const others = models.filter((m) => m.id !== model.id);
  const index = models.findIndex((m) => m.id === model.id);
  if (gone) state.remoteModels[fp] = others;
  else if (index >= 0) state.remoteModels[fp] = models.map((m) => (m.id === model.id ? model : m));
  else state.remoteModels[fp] = withoutPending(fp, [...models, model]);
}

function record(entry) {
  if (entry.id && state.log.some((old) => old.id === entry.id && old.type === entry.type)) return;
  state.log.unshift(entry);
  if (state.log.length > LOG_LIMIT) state.log.length = LOG_LIMIT;
}
