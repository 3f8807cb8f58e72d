// The views: functions of the store's state (and of the page's own UI state: which tab, which dialog) to lit-html
// templates. They hold no fleet data of their own and change nothing but through the store's actions.

import { html, nothing } from "../vendor/lit-html.js";
import * as store from "./store.js";
import { ago, bytes, clock, duration, shortFingerprint, since } from "./format.js";

export const ui = {
  tab: "fleet", // fleet | pool | playground
  loadFor: null, // the fingerprint whose load dialog is open
  confirmUnloadAll: null, // the fingerprint whose unload-all waits for confirmation
  signInError: null,
  signingIn: false,
  playground: { model: "", mode: "completion", prompt: "Once upon a time", maxTokens: 64, temperature: "", output: "", running: false, error: null, stats: null },
};

const READ_ONLY = "Read-only key: sign in with an operator key to load or unload models.";

// Why a control is disabled, or null when it may be used.
function blocked(fp) {
  if (!store.canOperate()) return READ_ONLY;
  const node = fp ? store.state.nodes[fp] : null;
  if (node && !node.online) return `${node.name} is offline.`;
  if (fp && store.useIsRemoteModelOperating(fp)) return `${store.state.operating[fp]}…`;
  return null;
}

const spinner = () => html`<span class="spinner" aria-hidden="true"></span>`;

function button(label, onClick, { reason = null, kind = "", testid = "", describe = "" } = {}) {
  return html`<button
    type="button"
    class="btn ${kind}"
    data-testid=${testid || nothing}
    ?disabled=${Boolean(reason)}
    title=${reason ?? nothing}
    aria-label=${describe || nothing}
    @click=${onClick}
  >
    ${label}
  </button>`;
}

// ---- Sign in -------------------------------------------------------------------------------------------------

export function signInView(actions) {
  return html`<main class="signin">
    <form class="card signin-card" @submit=${actions.signIn} autocomplete="off">
      <div class="brand big"><span class="logo" aria-hidden="true"></span>modelfleet</div>
      <p class="muted">Sign in with an API key to watch and control the fleet. The key is exchanged for a session
        cookie that scripts cannot read; it is not stored in this browser.</p>
      <label for="api-key">API key</label>
      <input id="api-key" name="key" type="password" required autofocus spellcheck="false" autocomplete="off" />
      ${ui.signInError ? html`<p class="notice error" role="alert">${ui.signInError}</p>` : nothing}
      <button class="btn primary" type="submit" ?disabled=${ui.signingIn}>
        ${ui.signingIn ? spinner() : nothing} Sign in
      </button>
    </form>
  </main>`;
}

// ---- Frame ---------------------------------------------------------------------------------------------------

export function appView(actions) {
  const s = store.state;
  const nodes = Object.values(s.nodes);
  const online = nodes.filter((n) => n.online).length;
  const modal = Boolean(ui.loadFor || ui.confirmUnloadAll);
  return html`
    <header class="topbar" ?inert=${modal}>
      <div class="brand"><span class="logo" aria-hidden="true"></span>modelfleet</div>
      <nav class="tabs" aria-label="Views">
        ${["fleet", "pool", "playground"].map(
          (tab) => html`<button
            type="button"
            class="tab ${ui.tab === tab ? "active" : ""}"
            aria-current=${ui.tab === tab ? "page" : "false"}
            data-testid="tab-${tab}"
            @click=${() => actions.tab(tab)}
          >
            ${{ fleet: "Fleet", pool: "Pool", playground: "Playground" }[tab]}
          </button>`,
        )}
      </nav>
      <div class="status">
        <span class="summary">${online}/${nodes.length} nodes online</span>
        <span class="conn ${s.connection}" role="status" data-testid="connection">
          <span class="dot" aria-hidden="true"></span>${{ live: "Live", connecting: "Connecting…", reconnecting: "Reconnecting…" }[s.connection]}
        </span>
        <span class="badge scope ${s.session.canOperate ? "operator" : "read"}" data-testid="scope">
          ${s.session.canOperate ? "Operator" : "Read-only"}
        </span>
        ${button("Sign out", actions.signOut, { kind: "ghost", testid: "sign-out" })}
      </div>
    </header>
    ${s.session.canOperate
      ? nothing
      : html`<div class="banner" id="read-only-reason" role="note" data-testid="read-only">${READ_ONLY}</div>`}
    <div class="layout" ?inert=${modal}>
      <main class="content">
        ${ui.tab === "fleet" ? fleetView(actions, nodes) : nothing}
        ${ui.tab === "pool" ? poolView(actions) : nothing}
        ${ui.tab === "playground" ? playgroundView(actions) : nothing}
      </main>
      ${logView()}
    </div>
    ${ui.loadFor ? loadDialog(actions, ui.loadFor) : nothing}
    ${ui.confirmUnloadAll ? confirmDialog(actions, ui.confirmUnloadAll) : nothing}
  `;
}

// ---- Fleet ---------------------------------------------------------------------------------------------------

function fleetView(actions, nodes) {
  if (!nodes.length) {
    return html`<section class="empty card"><h2>No nodes yet</h2>
      <p class="muted">Start a worker with <code>modelfleet worker --name NAME --models-dir DIR</code>; it appears here
        as soon as it registers.</p></section>`;
  }
  const sorted = [...nodes].sort((a, b) => Number(b.online) - Number(a.online) || a.name.localeCompare(b.name));
  return html`<section aria-label="Nodes" class="nodes">${sorted.map((n) => nodeCard(actions, n))}</section>`;
}

function memoryOf(node) {
  const m = store.state.memory[node.fingerprint];
  if (m) return { used: m.usedBytes, budget: m.budgetBytes };
  return { used: node.memoryUsedBytes ?? 0, budget: node.memoryBudgetBytes ?? null };
}

function nodeCard(actions, node) {
  const fp = node.fingerprint;
  const models = store.useRemoteModels(fp);
  const operating = store.state.operating[fp];
  const notice = store.state.notices[fp];
  const { used, budget } = memoryOf(node);
  const state = node.online
    ? html`<span class="pill online">online</span><span class="muted">up ${duration(since(node.startedAt))}</span>`
    : html`<span class="pill offline">offline</span><span class="muted">for ${duration(since(node.offlineSince))}</span>`;
  const reason = blocked(fp);
  return html`<article
    class="card node ${node.online ? "" : "is-offline"}"
    data-testid="node"
    data-node=${node.name}
    data-fingerprint=${fp}
    data-online=${String(node.online)}
    aria-busy=${operating ? "true" : "false"}
    aria-labelledby="node-${fp}"
  >
    <header class="node-head">
      <div class="node-id">
        <h2 id="node-${fp}">${node.name}</h2>
        <code class="fp" title=${fp}>${shortFingerprint(fp)}</code>
        ${state}
      </div>
      <div class="actions">
        ${operating ? html`<span class="operating" data-testid="operating">${spinner()} ${operating}…</span>` : nothing}
        ${button("Load model…", () => actions.openLoad(fp), { reason, kind: "primary", testid: "open-load", describe: `Load a model on ${node.name}` })}
        ${button("Unload all", () => actions.askUnloadAll(fp), { reason: reason ?? (models.length ? null : "Nothing is loaded."), kind: "danger-ghost", testid: "unload-all", describe: `Unload every model on ${node.name}` })}
      </div>
    </header>
    <div class="node-stats">
      <div class="memory" title="Memory the node's models hold, of its budget">
        <meter class="meter" aria-label="Memory used on ${node.name}" min="0" max=${budget ?? Math.max(used, 1)}
          .value=${used} low=${budget ? budget * 0.75 : nothing} high=${budget ? budget * 0.9 : nothing} optimum="0"></meter>
        <span class="muted">${bytes(used)} / ${budget ? bytes(budget) : "no budget"}</span>
      </div>
      <span class="muted">${models.length} model${models.length === 1 ? "" : "s"}</span>
      <span class="muted">${node.hostname}</span>
    </div>
    ${notice ? noticeView(notice, () => store.dismissNotice(fp)) : nothing}
    ${models.length ? modelTable(node, models, reason) : html`<p class="muted none">No models loaded.</p>`}
  </article>`;
}

function noticeView(notice, dismiss) {
  return html`<div class="notice ${notice.kind}" role=${notice.kind === "error" ? "alert" : "status"} data-testid="notice">
    <span>${notice.text}</span>
    <button type="button" class="icon" aria-label="Dismiss" @click=${dismiss}>×</button>
  </div>`;
}

// A loaded model takes prompts once it answers its health check (right after the load, then periodically).
function healthView(m) {
  if (m.state !== "loaded") return nothing;
  if (m.checking) return html`<div class="muted health" data-testid="health">checking…</div>`;
  if (m.healthy === false) {
    return html`<div class="reason health" data-testid="health" title="Unload it and load it again; with a larger context if its context is tiny.">Not answering: it failed its health check, so no prompts go to it.</div>`;
  }
  return nothing;
}

function modelTable(node, models, reason) {
  const fp = node.fingerprint;
  return html`<table class="models">
    <thead><tr>
      <th scope="col">Model</th><th scope="col">State</th><th scope="col">Size</th><th scope="col">Context</th>
      <th scope="col">Pinned</th><th scope="col">Last use</th><th scope="col">In flight</th><th scope="col"><span class="sr-only">Actions</span></th>
    </tr></thead>
    <tbody>
      ${models.map(
        (m) => html`<tr data-testid="model" data-model=${m.id} data-state=${m.state}>
          <th scope="row"><span class="model-id">${m.id}</span></th>
          <td>
            <span class="state ${m.state}" data-testid="state">${m.state}</span>
            ${m.state === "failed" && m.error ? html`<div class="reason" data-testid="reason">${m.error}</div>` : nothing}
            ${healthView(m)}
          </td>
          <td>${bytes(m.sizeBytes)}</td>
          <td>${m.contextLength ?? "–"}</td>
          <td>${m.pinned ? html`<span class="pin" title="Never evicted">pinned</span>` : "–"}</td>
          <td>${m.lastUsed ? ago(m.lastUsed) : "–"}</td>
          <td data-testid="in-flight" title=${`${m.tokensGenerated ?? 0} tokens generated since it loaded`}>${m.state === "loaded" && node.online ? `${m.inFlight ?? 0}${m.queued ? ` (+${m.queued} queued)` : ""}` : "–"}</td>
          <td class="row-actions">
            ${m.state === "loaded"
              ? button("Unload", () => store.unloadModelOnNode(fp, m.id), { reason, kind: "small", testid: "unload", describe: `Unload ${m.id} from ${node.name}` })
              : nothing}
          </td>
        </tr>`,
      )}
    </tbody>
  </table>`;
}

// ---- Dialogs -------------------------------------------------------------------------------------------------

function loadDialog(actions, fp) {
  const node = store.state.nodes[fp];
  const files = store.state.files[fp];
  const memory = store.state.memory[fp];
  const loaded = new Set(store.useRemoteModels(fp).filter((m) => m.state !== "failed").map((m) => m.id));
  const free = memory?.freeBytes ?? null;
  const reason = blocked(fp);
  // Preselect the first file that is not loaded and fits; the operator picks another with the arrow keys.
  const suggested =
    files?.find((f) => !f.problem && !loaded.has(f.id) && (free === null || f.estimateBytes <= free)) ?? files?.[0];
  return html`<div class="backdrop" @click=${(e) => e.target === e.currentTarget && actions.closeDialogs()}>
    <form class="dialog card" role="dialog" aria-modal="true" aria-labelledby="load-title" data-testid="load-dialog"
      @submit=${(e) => actions.submitLoad(e, fp)} @keydown=${(e) => e.key === "Escape" && actions.closeDialogs()}>
      <h2 id="load-title">Load a model on ${node?.name ?? fp}</h2>
      <p class="muted">${memory ? html`${bytes(memory.usedBytes)} used of ${memory.budgetBytes ? bytes(memory.budgetBytes) : "no budget"}; ${free === null ? "no limit" : `${bytes(free)} free`}.` : "Reading the node's catalog…"}</p>
      ${files === undefined
        ? html`<p>${spinner()} Loading the catalog…</p>`
        : files.length === 0
          ? html`<p class="muted">The node's models directory holds no GGUF file.</p>`
          : html`<fieldset class="files">
              <legend>Model file</legend>
              ${files.map((f, i) => {
                const fits = f.estimateBytes !== null && (free === null || f.estimateBytes <= free);
                const isLoaded = loaded.has(f.id);
                const tag = f.problem
                  ? html`<span class="fit no" title=${f.problem}>cannot load</span>`
                  : isLoaded
                    ? html`<span class="fit loaded">loaded</span>`
                    : fits
                      ? html`<span class="fit yes">fits now</span>`
                      : html`<span class="fit no">needs ${bytes(f.estimateBytes - free)} more</span>`;
                return html`<label class="file ${fits ? "" : "nofit"}">
                  <input type="radio" name="modelId" value=${f.id} ?checked=${f === suggested} ?required=${i === 0} />
                  <span class="file-id">${f.id}</span>
                  <span class="muted">${f.problem ?? html`${bytes(f.sizeBytes)} file · needs ~${bytes(f.estimateBytes)}`}</span>
                  ${tag}
                </label>`;
              })}
            </fieldset>`}
      <div class="row">
        <label><span>Context length <span class="muted">(optional)</span></span>
          <input name="contextLength" type="number" min="1" max="1048576" inputmode="numeric" placeholder="model default" /></label>
        <label><span>GPU layers <span class="muted">(optional, -1 = all)</span></span>
          <input name="gpuLayers" type="number" min="-1" max="10000" inputmode="numeric" placeholder="default" /></label>
      </div>
      <div class="dialog-actions">
        <button type="button" class="btn ghost" @click=${actions.closeDialogs}>Cancel</button>
        <button type="submit" class="btn primary" data-testid="load-submit" ?disabled=${Boolean(reason) || !files?.length} title=${reason ?? nothing}>Load</button>
      </div>
    </form>
  </div>`;
}

function confirmDialog(actions, fp) {
  const node = store.state.nodes[fp];
  const models = store.useRemoteModels(fp);
  return html`<div class="backdrop" @click=${(e) => e.target === e.currentTarget && actions.closeDialogs()}>
    <div class="dialog card" role="alertdialog" aria-modal="true" aria-labelledby="confirm-title" aria-describedby="confirm-text"
      data-testid="confirm-dialog" @keydown=${(e) => e.key === "Escape" && actions.closeDialogs()}>
      <h2 id="confirm-title">Unload every model on ${node?.name}?</h2>
      <p id="confirm-text">${models.map((m) => m.id).join(", ") || "Nothing"} will be unloaded. Requests to these models will fail
        until they are loaded again.</p>
      <div class="dialog-actions">
        <button type="button" class="btn ghost" @click=${actions.closeDialogs} autofocus>Cancel</button>
        <button type="button" class="btn danger" data-testid="confirm-unload-all" @click=${() => actions.unloadAll(fp)}>Unload all</button>
      </div>
    </div>
  </div>`;
}

// ---- Pool ----------------------------------------------------------------------------------------------------

function poolView(actions) {
  const s = store.state;
  const names = (fps) => fps.map((fp) => s.nodes[fp]?.name ?? shortFingerprint(fp));
  const reason = !store.canOperate() ? READ_ONLY : s.poolOperating ? `Placing ${s.poolOperating}…` : null;
  return html`<section class="card pool" aria-labelledby="pool-title">
    <header class="section-head">
      <h2 id="pool-title">Pool</h2>
      <span class="muted">Every model file in the fleet and where it is loaded. “Load” places it on the node with the most room.</span>
    </header>
    ${s.poolNotice ? noticeView(s.poolNotice, () => store.dismissNotice(null)) : nothing}
    ${s.pool.errors.map((e) => html`<div class="notice error">${e.node_name}: ${e.error}</div>`)}
    ${!s.pool.fetched
      ? html`<p>${spinner()} Reading the pool…</p>`
      : html`<table class="models">
          <thead><tr><th scope="col">Model</th><th scope="col">State</th><th scope="col">Loaded on</th>
            <th scope="col">Available on</th><th scope="col">Size</th><th scope="col">Needs</th><th scope="col"><span class="sr-only">Actions</span></th></tr></thead>
          <tbody>
            ${s.pool.models.map(
              (m) => html`<tr data-testid="pool-model" data-model=${m.id} data-state=${m.state}>
                <th scope="row"><span class="model-id">${m.id}</span></th>
                <td><span class="state ${m.state}">${m.state}</span></td>
                <td data-testid="loaded-on">${m.loaded_on.length ? names(m.loaded_on).join(", ") : html`<span class="muted">–</span>`}</td>
                <td class="muted">${names(m.nodes).join(", ")}</td>
                <td>${bytes(m.size_bytes)}</td>
                <td>${bytes(m.estimate_bytes)}</td>
                <td class="row-actions">
                  ${s.poolOperating === m.id ? html`${spinner()} placing…` : nothing}
                  ${button("Load", () => store.poolLoad(m.id), { reason: reason ?? (m.loaded_on.length ? "Already loaded." : null), kind: "small", testid: "pool-load", describe: `Load ${m.id} where it fits best` })}
                </td>
              </tr>`,
            )}
          </tbody>
        </table>`}
  </section>`;
}

// ---- Playground ----------------------------------------------------------------------------------------------

export function loadedModels() {
  return store.state.pool.models.filter((m) => m.loaded_on.length).map((m) => m.id);
}

function playgroundView(actions) {
  const p = ui.playground;
  const models = loadedModels();
  const model = models.includes(p.model) ? p.model : (models[0] ?? "");
  return html`<section class="card playground" aria-labelledby="pg-title">
    <header class="section-head">
      <h2 id="pg-title">Playground</h2>
      <span class="muted">Send a prompt to a loaded model and watch the answer stream.</span>
    </header>
    <form class="pg-form" @submit=${actions.sendPrompt}>
      <div class="row">
        <label>Model
          <select name="model" data-testid="pg-model" ?disabled=${p.running}>
            ${models.length ? models.map((id) => html`<option value=${id} ?selected=${id === model}>${id}</option>`) : html`<option value="">No model is loaded</option>`}
          </select></label>
        <label>Endpoint
          <select name="mode" ?disabled=${p.running}>
            <option value="completion" ?selected=${p.mode === "completion"}>/v1/completions</option>
            <option value="chat" ?selected=${p.mode === "chat"}>/v1/chat/completions</option>
          </select></label>
        <label>Max tokens <input name="maxTokens" type="number" min="1" max="4096" .value=${String(p.maxTokens)} ?disabled=${p.running} /></label>
        <label>Temperature <input name="temperature" type="number" min="0" max="2" step="0.05" placeholder="1" title="0 always picks the likeliest token: the same prompt gets the same answer." .value=${p.temperature} ?disabled=${p.running} /></label>
      </div>
      <label for="pg-prompt">Prompt</label>
      <textarea id="pg-prompt" name="prompt" rows="4" data-testid="pg-prompt" .value=${p.prompt} ?disabled=${p.running}></textarea>
      <div class="dialog-actions">
        ${p.running
          ? html`<span class="operating">${spinner()} streaming…</span>
              <button type="button" class="btn danger" data-testid="pg-stop" @click=${actions.stopPrompt}>Stop</button>`
          : html`<button type="submit" class="btn primary" data-testid="pg-send" ?disabled=${!model} title=${model ? nothing : "Load a model first."}>Send</button>`}
      </div>
    </form>
    ${p.error ? html`<div class="notice error" role="alert">${p.error}</div>` : nothing}
    <output class="pg-output" data-testid="pg-output" aria-live="polite">${p.sent && p.sent.mode === "completion"
      ? html`<span class="pg-sent">${p.sent.prompt}</span>`
      : nothing}${p.output}</output>
    ${p.stats ? html`<p class="muted" data-testid="pg-stats">${p.stats}</p>` : nothing}
  </section>`;
}

// ---- Event log -----------------------------------------------------------------------------------------------

function logView() {
  const log = store.state.log;
  return html`<aside class="card log" aria-labelledby="log-title">
    <header class="section-head"><h2 id="log-title">Events</h2><span class="muted">${log.length}</span></header>
    <ol class="events" data-testid="event-log" aria-live="polite">
      ${log.map(
        (e) => html`<li class="event ${e.type}" data-type=${e.type} data-id=${e.id ?? ""}>
          <time datetime=${e.at}>${clock(e.at)}</time>
          <span class="etype">${e.type}</span>
          <span class="edetail">${e.name ? html`<span class="enode">${e.name}</span> · ` : nothing}<span class="etext">${e.text}</span></span>
        </li>`,
      )}
    </ol>
  </aside>`;
}
