// The console's entry point: asks for the API key when the server wants one, then routes
// #/ (jobs), #/jobs/<id> (a job) and #/chat (the playground) without reloading the page.
import { api, apiKey, setUnauthorizedHandler } from "./api.js";
import { h } from "./dom.js";
import { chatView } from "./chat.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";

const view = document.getElementById("view");
const login = document.getElementById("login");
const loginForm = document.getElementById("login-form");
const loginError = document.getElementById("login-error");
const keyInput = document.getElementById("api-key");
const signout = document.getElementById("signout");
let current = null; // the AbortController of the shown view: its streams and timers stop with it

function route() {
  if (current) current.abort();
  current = new AbortController();
  view.replaceChildren();
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query);
  const job = path.match(/^\/jobs\/(qjob-[0-9a-f]+)$/);
  let name = "jobs";
  if (job) jobView(view, current.signal, job[1]);
  else if (path === "/chat") { name = "chat"; chatView(view, current.signal, params); }
  else { view.append(h("h1", {}, "Quantization jobs")); jobsView(view, current.signal); }
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === name && !job) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${job ? job[1] : name === "chat" ? "Chat" : "Jobs"} · metal-marlin`;
}

function askForKey(message) {
  if (current) current.abort();
  view.replaceChildren();
  login.hidden = false;
  loginError.textContent = message || "";
  signout.hidden = true;
  keyInput.focus();
}

function start() {
  login.hidden = true;
  signout.hidden = !apiKey.get();
  route();
}

loginForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  apiKey.set(keyInput.value.trim());
  try {
    await api("/v1/models");
    keyInput.value = "";
    start();
  } catch (e) {
    apiKey.clear();
    loginError.textContent = e.status === 401 ? "That key is not accepted by this server." : e.message;
  }
});

signout.addEventListener("click", () => { apiKey.clear(); askForKey(""); });
setUnauthorizedHandler((error) => {
  const had = Boolean(apiKey.get());
  apiKey.clear();
  askForKey(had ? `The saved key no longer works (${error.message}).` : "");
});
window.addEventListener("hashchange", () => { if (login.hidden) route(); });

// One authorised call decides: the API answers, or says it wants a key.
api("/v1/models").then(start).catch((e) => { if (e.status !== 401) start(); });
