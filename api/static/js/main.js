// Wires the store to the views: renders on every change (and once a second, for "up 5m" and "2m ago"), and turns
// the views' events into store actions. Page-only state (tab, open dialog, the playground's text) lives in `ui`.

import { render } from "../vendor/lit-html.js";
import { stream } from "./api.js";
import * as store from "./store.js";
import { appView, loadedModels, signInView, ui } from "./views.js";

const root = document.getElementById("app");
let controller = null;
let returnFocus = null;

function draw() {
  const s = store.state;
  if (s.phase === "starting") return;
  if (!root.dataset.drawn) {
    root.textContent = ""; // the "Loading…" placeholder; lit renders into an empty container from here on
    root.dataset.drawn = "1";
  }
  render(s.phase === "signed-out" ? signInView(actions) : appView(actions), root);
}

function focusSoon(selector) {
  requestAnimationFrame(() => document.querySelector(selector)?.focus());
}

const actions = {
  async signIn(e) {
    e.preventDefault();
    const input = e.target.elements.key;
    const key = input.value;
    ui.signingIn = true;
    ui.signInError = null;
    draw();
    try {
      await store.signIn(key);
    } catch (err) {
      ui.signInError = err.status === 401 ? "That key is not valid here." : err.message;
    } finally {
      input.value = ""; // the key leaves the page as soon as it has been exchanged for a session
      ui.signingIn = false;
      draw();
    }
  },
  async signOut() {
    actions.stopPrompt();
    await store.signOut();
    ui.tab = "fleet";
  },
  tab(name) {
    ui.tab = name;
    draw();
  },
  openLoad(fp) {
    returnFocus = document.activeElement;
    ui.loadFor = fp;
    draw();
    store.fetchRemoteModels(fp); // fresh estimates and free memory for the dialog
    focusSoon('[data-testid="load-dialog"] input, [data-testid="load-dialog"] button');
  },
  askUnloadAll(fp) {
    returnFocus = document.activeElement;
    ui.confirmUnloadAll = fp;
    draw();
    focusSoon('[data-testid="confirm-dialog"] button');
  },
  closeDialogs() {
    ui.loadFor = null;
    ui.confirmUnloadAll = null;
    draw();
    returnFocus?.focus?.();
  },
  submitLoad(e, fp) {
    e.preventDefault();
    const form = new FormData(e.target);
    const number = (name) => (form.get(name) === "" || form.get(name) === null ? undefined : Number(form.get(name)));
    const modelId = form.get("modelId");
    if (!modelId) return;
    actions.closeDialogs();
    store.loadModelOnNode(fp, { modelId, contextLength: number("contextLength"), gpuLayers: number("gpuLayers") });
  },
  unloadAll(fp) {
    actions.closeDialogs();
    store.unloadAllOnNode(fp);
  },
  async sendPrompt(e) {
    e.preventDefault();
    const form = new FormData(e.target);
    const p = ui.playground;
    p.model = form.get("model") || loadedModels()[0] || "";
    p.mode = form.get("mode");
    p.prompt = form.get("prompt");
    p.maxTokens = Number(form.get("maxTokens")) || 64;
    p.temperature = form.get("temperature"); // blank: not sent, so the default (1, as OpenAI's)
    if (!p.model) return;
    p.output = "";
    p.sent = { mode: p.mode, prompt: p.prompt }; // a completion continues the prompt: show it before the answer
    p.error = null;
    p.stats = null;
    p.running = true;
    draw();
    controller = new AbortController();
    const chat = p.mode === "chat";
    const body = { model: p.model, max_tokens: p.maxTokens, stream: true };
    if (p.temperature !== "") body.temperature = Number(p.temperature);
    if (chat) body.messages = [{ role: "user", content: p.prompt }];
    else body.prompt = p.prompt;
    const started = performance.now();
    let pieces = 0;
    let finish = null;
    try {
      for await (const chunk of stream(chat ? "/v1/chat/completions" : "/v1/completions", body, controller.signal)) {
        const choice = chunk.choices?.[0];
        const text = chat ? (choice?.delta?.content ?? "") : (choice?.text ?? "");
        if (text) {
          p.output += text;
          pieces += 1;
          draw();
        }
        finish = choice?.finish_reason ?? finish;
      }
      p.stats = `${pieces} chunks in ${((performance.now() - started) / 1000).toFixed(2)}s${finish ? ` · finish: ${finish}` : ""}`;
    } catch (err) {
      if (err.name === "AbortError") p.stats = `Stopped after ${pieces} chunks.`;
      else p.error = err.message;
    } finally {
      p.running = false;
      controller = null;
      draw();
    }
  },
  stopPrompt() {
    controller?.abort();
  },
};

store.subscribe(draw);
setInterval(draw, 1000); // relative times ("up 5m", "2m ago") move on; no request is made
store.start().catch((err) => {
  root.textContent = `The dashboard could not start: ${err.message}`;
});
