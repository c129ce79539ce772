// The jobs page: the submit form, and every job with a progress bar fed live by its events.
import { api } from "./api.js";
import { describeSettings, formatTime, h } from "./dom.js";
import { isActive, progressView, watchJob } from "./progress.js";
import { submitForm } from "./submit.js";

const REFRESH_MS = 5000;
// Browsers keep at most 6 connections per server over HTTP/1.1: leave room for the rest.
const MAX_LIVE = 3;

function statusBadge(status) {
  return h("span", { class: `status status-${status}`, dataset: { status } }, status);
}

function jobRow(job) {
  const badge = h("span", { class: "badge-slot" });
  const progress = progressView(`Progress of ${job.id}`);
  const node = h("li", { class: "job", dataset: { jobId: job.id } },
    h("div", { class: "job-head" }, h("a", { href: `#/jobs/${job.id}`, class: "job-id" }, job.id), badge),
    h("div", { class: "job-meta" },
      h("span", { class: "job-model" }, job.model), " · ",
      h("span", { class: "job-settings" }, describeSettings(job.hyperparameters)), " · ",
      h("time", {}, formatTime(job.created_at))),
    progress.node);
  const row = {
    node, job, live: null,
    update(next) {
      row.job = next;
      badge.replaceChildren(statusBadge(next.status));
      progress.update(next);
    },
  };
  row.update(job);
  return row;
}

export function jobsView(root, signal) {
  const rows = new Map();
  const list = h("ol", { class: "jobs", "aria-label": "Quantization jobs" });
  const empty = h("p", { class: "muted" }, "No jobs yet: submit one with the form.");
  const error = h("p", { class: "error", role: "alert" });

  function follow(row) {
    if (row.live || !isActive(row.job) || [...rows.values()].filter((r) => r.live).length >= MAX_LIVE) return;
    row.live = new AbortController();
    signal.addEventListener("abort", () => row.live && row.live.abort());
    watchJob(row.job, { signal: row.live.signal, onEvent: (_event, job) => row.update(job) })
      .catch(() => {})
      .finally(() => { row.live = null; });
  }

  function show(jobs) {
    jobs.forEach((job, i) => {
      let row = rows.get(job.id);
      if (!row) rows.set(job.id, (row = jobRow(job)));
      else if (!row.live) row.update(job); // a followed job's stream is fresher than the list
      // in list order, newest first; rows already in place stay put (moving one drops its focus)
      if (list.children[i] !== row.node) list.insertBefore(row.node, list.children[i] || null);
      follow(row);
    });
    empty.hidden = rows.size > 0;
  }

  async function refresh() {
    try {
      show((await api("/v1/quantization/jobs?limit=50", { signal })).data);
      error.textContent = "";
    } catch (e) {
      if (!signal.aborted) error.textContent = `Could not list the jobs: ${e.message}`;
    }
  }

  const form = submitForm({
    signal,
    onSubmitted: (job) => {
      const row = rows.get(job.id) || jobRow(job);
      rows.set(job.id, row);
      list.prepend(row.node);
      empty.hidden = true;
      follow(row);
    },
  });
  root.append(h("div", { class: "columns" },
    form,
    h("section", { class: "card", "aria-labelledby": "jobs-title" }, h("h2", { id: "jobs-title" }, "Jobs"), error, empty, list)));
  refresh();
  const timer = setInterval(refresh, REFRESH_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
}
