// A job's live state: its events folded into the job object, and the progress bar that shows
// it. The jobs list and the job page both use these, so a bar means the same thing on both.
import { api, stream } from "./api.js";
import { h } from "./dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

/** The job as it stands after `event` (the event stream is the live source of truth). */
export function foldEvent(job, event) {
  const next = { ...job };
  if (event.type === "started") Object.assign(next, { status: "running", progress: null });
  else if (event.type === "progress") Object.assign(next, { status: "running", progress: event.data });
  else if (event.type === "requeued") Object.assign(next, { status: "queued", progress: null });
  else if (event.type === "cancel_requested") next.cancel_requested = true;
  else if (TERMINAL.has(event.type)) next.status = event.type;
  return next;
}

/** A labelled <progress> with a text line; `update(job)` keeps both current. */
export function progressView(label) {
  const bar = h("progress", { max: 1, value: 0, "aria-label": label });
  const text = h("span", { class: "progress-text" });
  const update = (job) => {
    const p = job.progress;
    if (job.status === "succeeded") {
      bar.max = 1;
      bar.value = 1;
      text.textContent = "done";
    } else if (job.status === "running" && p && p.n_blocks > 0) {
      // a list refresh may carry an older snapshot than the stream: never move backwards
      const before = bar.hasAttribute("value") && Number(bar.max) === p.n_blocks ? Number(bar.value) : 0;
      bar.max = p.n_blocks;
      bar.value = Math.max(p.block, before);
      text.textContent = `${p.stage} · block ${p.block}/${p.n_blocks}`;
    } else if (job.status === "running") {
      bar.removeAttribute("value"); // indeterminate while the model and calibration data load
      text.textContent = p ? p.stage : "starting";
    } else if (job.status === "queued") {
      bar.value = 0;
      text.textContent = "waiting for the worker";
    } else {
      text.textContent = job.status;
    }
    if (job.cancel_requested && !TERMINAL.has(job.status)) text.textContent += " · cancelling";
  };
  return { node: h("div", { class: "progress" }, bar, text), bar, update };
}

/**
 * Follow a job's events live: onEvent(event, job) per event with the folded job; once the
 * stream says [DONE], onEvent(null, job) with the job re-read (its result, stats, error).
 */
export async function watchJob(job, { signal, onEvent }) {
  let current = job;
  const done = await stream(`/v1/quantization/jobs/${job.id}/events?stream=true`, {
    signal,
    resume: true,
    onEvent: (event) => {
      current = foldEvent(current, event);
      onEvent(event, current);
    },
  });
  if (done && !(signal && signal.aborted)) onEvent(null, await api(`/v1/quantization/jobs/${job.id}`, { signal }));
}

export const isActive = (job) => !TERMINAL.has(job.status);
