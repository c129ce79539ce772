// The chat playground: any served model (built-in, --model ones, succeeded jobs), streamed
// over /v1/chat/completions, with the sampling settings and the decode speed shown.
import { api, stream } from "./api.js";
import { field, h, select } from "./dom.js";

function numberField(id, label, value, min, max, step) {
  return field(label, h("input", { id, name: id, type: "number", value: String(value), min: String(min), max: String(max), step: String(step), inputmode: "decimal" }));
}

/** "42 tokens · 31.5 tokens/s · first token after 0.21 s". */
function speedText(tokens, started, firstAt, endedAt) {
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  if (tokens > 1 && endedAt > firstAt) parts.push(`${((tokens - 1) / ((endedAt - firstAt) / 1000)).toFixed(1)} tokens/s`);
  if (firstAt) parts.push(`first token after ${((firstAt - started) / 1000).toFixed(2)} s`);
  return parts.join(" · ");
}

export function chatView(root, signal, params) {
  const wanted = params.get("model") || "";
  const model = select("chat-model", wanted ? [[wanted, wanted]] : [], wanted);
  const temperature = numberField("temperature", "Temperature", 0.7, 0, 2, 0.1);
  const topP = numberField("top-p", "top_p", 0.95, 0.01, 1, 0.01);
  const maxTokens = numberField("max-tokens", "Max tokens", 256, 1, 4096, 1);
  const system = h("textarea", { id: "system-prompt", name: "system-prompt", rows: 2, placeholder: "Optional" });
  const log = h("div", { class: "messages", role: "log", "aria-label": "Conversation", "aria-live": "polite" });
  const input = h("textarea", { id: "message", name: "message", rows: 3, required: true, placeholder: "Ask something; Enter sends, Shift+Enter starts a new line" });
  const send = h("button", { type: "submit" }, "Send");
  const stop = h("button", { type: "button", class: "quiet", disabled: true }, "Stop");
  const clear = h("button", { type: "button", class: "quiet" }, "Clear");
  const speed = h("p", { class: "speed", id: "chat-speed", role: "status" });
  const error = h("p", { class: "error", role: "alert" });
  const history = [];
  let running = null;

  api("/v1/models", { signal }).then((models) => {
    const ids = models.data.map((m) => m.id);
    if (wanted && !ids.includes(wanted)) ids.unshift(wanted);
    model.replaceChildren(...ids.map((id) => h("option", { value: id, selected: id === wanted }, id)));
  }).catch((e) => { if (!signal.aborted) error.textContent = `Could not list the models: ${e.message}`; });

  function bubble(role, text) {
    const body = h("div", { class: "msg-text" }, text);
    log.append(h("div", { class: `msg msg-${role}`, dataset: { role } }, h("span", { class: "msg-role" }, role), body));
    log.scrollTop = log.scrollHeight;
    return body;
  }

  async function ask(content) {
    history.push({ role: "user", content });
    bubble("user", content);
    const out = bubble("assistant", "");
    out.classList.add("pending");
    const messages = system.value.trim() ? [{ role: "system", content: system.value.trim() }, ...history] : [...history];
    const body = {
      model: model.value, messages, stream: true, stream_options: { include_usage: true },
      temperature: Number(temperature.querySelector("input").value),
      top_p: Number(topP.querySelector("input").value),
      max_tokens: Number(maxTokens.querySelector("input").value),
    };
    const started = performance.now();
    let firstAt = 0;
    let chunks = 0;
    let usage = null;
    let text = "";
    running = new AbortController();
    signal.addEventListener("abort", () => running && running.abort());
    speed.textContent = "Waiting for the model (a model is loaded on its first use)…";
    try {
      await stream("/v1/chat/completions", {
        method: "POST", json: body, signal: running.signal,
        onEvent: (chunk) => {
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (!delta || !delta.content) return;
          if (!firstAt) firstAt = performance.now();
          chunks += 1;
          text += delta.content;
          out.textContent = text;
          log.scrollTop = log.scrollHeight;
          speed.textContent = speedText(chunks, started, firstAt, performance.now());
        },
      });
    } catch (e) {
      error.textContent = e.message;
    } finally {
      out.classList.remove("pending");
      const tokens = usage ? usage.completion_tokens : chunks;
      if (firstAt) speed.textContent = speedText(tokens, started, firstAt, performance.now());
      else if (!error.textContent) speed.textContent = running.signal.aborted ? "Stopped." : "";
      if (text) history.push({ role: "assistant", content: text });
      else history.pop(); // nothing came back: the next turn is sent without this question
      running = null;
    }
  }

  const form = h("form", { class: "chat-form" }, field("Message", input), h("div", { class: "buttons" }, send, stop, clear), speed, error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const content = input.value.trim();
    if (!content || running) return;
    input.value = "";
    error.textContent = "";
    send.disabled = true;
    stop.disabled = false;
    await ask(content);
    send.disabled = false;
    stop.disabled = true;
    input.focus();
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => running && running.abort());
  clear.addEventListener("click", () => { history.length = 0; log.replaceChildren(); speed.textContent = ""; });

  root.append(h("h1", {}, "Chat"), h("div", { class: "chat" },
    h("section", { class: "card settings", "aria-label": "Settings" }, field("Model", model), temperature, topP, maxTokens, field("System prompt", system)),
    h("section", { class: "card conversation", "aria-label": "Conversation" }, log, form)));
}
