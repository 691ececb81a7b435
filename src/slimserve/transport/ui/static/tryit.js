// "Try it": one request to any model through the public APIs, with the same key: KServe v2
// JSON tensors, text for models that take text, a streamed chat for language models.
import { el, errorOf, headers, request } from "./api.js";

const $ = (id) => document.getElementById(id);

export class TryIt {
  constructor() {
    this.models = new Map(); // served name -> model view
    this.messages = [];
    this.mode = null;
    $("try-model").addEventListener("change", () => this.select());
    $("try-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
  }

  setModels(models) {
    const select = $("try-model");
    const names = [];
    for (const m of models) {
      names.push(m.name);
      this.models.set(m.name, m);
      const version = m.default_version;
      for (const u of m.units) {
        if (u.variant && u.version === version) {
          names.push(`${m.name}:${u.variant}`);
          this.models.set(`${m.name}:${u.variant}`, m);
        }
      }
    }
    const current = [...select.options].map((o) => o.value).join("|");
    if (current === names.join("|")) return;
    const chosen = select.value;
    select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    if (names.includes(chosen)) select.value = chosen;
    this.select();
  }

  select() {
    const model = this.models.get($("try-model").value);
    if (!model) return;
    const mode = model.task === "text-generation" ? "chat"
      : model.inputs.length && model.inputs.every((s) => s.datatype === "BYTES") ? "text" : "tensors";
    $("try-tensors").hidden = mode !== "tensors";
    $("try-text").hidden = mode !== "text";
    $("try-chat").hidden = mode !== "chat";
    if (mode === "tensors" && (this.mode !== "tensors" || this.templateFor !== model.name)) {
      $("try-body").value = JSON.stringify(template(model), null, 1);
      this.templateFor = model.name;
    }
    if (mode !== this.mode) this.messages = [];
    this.mode = mode;
  }

  async send() {
    const served = $("try-model").value;
    const model = this.models.get(served);
    if (!model) return;
    $("try-error").textContent = "";
    $("try-output").textContent = "";
    $("try-meta").textContent = "sending...";
    $("try-send").disabled = true;
    try {
      if (this.mode === "chat") await this.chat(served);
      else await this.infer(served, this.mode === "text" ? textRequest(model) : $("try-body").value);
    } catch (err) {
      $("try-meta").textContent = "";
      $("try-error").textContent = err.message;
    } finally {
      $("try-send").disabled = false;
    }
  }

  async infer(served, body) {
    const started = performance.now();
    const response = await request("POST", `/v2/models/${encodeURIComponent(served)}/infer`, body);
    const doc = await response.json();
    const ms = performance.now() - started;
    const degraded = doc.parameters && doc.parameters.degraded ? " (degraded: the original was under pressure)" : "";
    $("try-meta").textContent =
      `answered by ${doc.model_name} version ${doc.model_version}${degraded} in ${ms.toFixed(1)} ms`;
    $("try-output").textContent = JSON.stringify(doc.outputs, null, 1);
  }

  async chat(served) {
    const text = $("chat-input").value;
    if (!text.trim()) throw new Error("write a message first");
    this.messages.push({ role: "user", content: text });
    $("chat-input").value = "";
    const log = $("chat-log");
    log.append(el("div", { class: "msg user" }, text));
    const answer = el("div", { class: "msg assistant" });
    log.append(answer);
    const body = {
      model: served, messages: this.messages, stream: true,
      stream_options: { include_usage: true }, max_tokens: Number($("chat-max").value) || 64,
    };
    const started = performance.now();
    const response = await fetch("/v1/chat/completions", {
      method: "POST", cache: "no-store", credentials: "omit",
      headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
    });
    if (!response.ok) {
      this.messages.pop();
      answer.remove();
      throw await errorOf(response);
    }
    const result = await readStream(response, answer, started);
    this.messages.push({ role: "assistant", content: answer.textContent });
    const total = performance.now() - started;
    const tokens = result.usage ? `, ${result.usage.completion_tokens} tokens` : "";
    $("try-meta").textContent = `answered by ${result.model} in ${total.toFixed(0)} ms ` +
      `(first token after ${result.ttft === null ? "-" : result.ttft.toFixed(0)} ms${tokens})`;
    if (result.error) throw new Error(result.error);
  }
}

// Reads `data: {...}\n\n` events, appending each content delta to `target` as it arrives.
async function readStream(response, target, started) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const out = { model: "", usage: null, ttft: null, error: null };
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const chunk = JSON.parse(event.slice(6));
      if (chunk.error) { out.error = chunk.error.message || String(chunk.error); continue; }
      out.model = chunk.model || out.model;
      if (chunk.usage) out.usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (out.ttft === null) out.ttft = performance.now() - started;
        target.append(delta.content);
      }
    }
  }
  return out;
}

function template(model) {
  return {
    inputs: model.inputs.map((s) => {
      const shape = s.shape.map((d) => (d < 0 ? 1 : d));
      const size = shape.reduce((a, b) => a * b, 1);
      const fill = s.datatype === "BYTES" ? "" : s.datatype === "BOOL" ? false : 0;
      return { name: s.name, datatype: s.datatype, shape, data: new Array(size).fill(fill) };
    }),
  };
}

function textRequest(model) {
  const text = $("try-text-input").value;
  return {
    inputs: model.inputs.map((s) => ({
      name: s.name, datatype: "BYTES", shape: s.shape.map((d) => (d < 0 ? 1 : d)), data: [text],
    })),
  };
}
