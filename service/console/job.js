// A job's page: its settings, live progress and event log, cancel while it runs, and once it
// has succeeded the result's size, downloads, the per-block error chart and "serve and chat".
import { api, apiKey, download } from "./api.js";
import { blockErrorFigure } from "./chart.js";
import { describeSettings, formatBytes, formatDuration, formatTime, h } from "./dom.js";
import { isActive, progressView, watchJob } from "./progress.js";

function eventItem(event) {
  const time = new Date(event.created_at * 1000);
  return h("li", { class: `event level-${event.level}`, dataset: { type: event.type } },
    h("time", { datetime: time.toISOString() }, time.toLocaleTimeString()), " ",
    h("span", { class: "event-type" }, event.type), " ", event.message);
}

function details(job) {
  const hp = job.hyperparameters;
  const rows = [
    ["Model", job.model],
    ["Settings", describeSettings(hp)],
    ["Salient ratio", String(hp.salient_ratio)],
    ["Calibration", `${hp.n_samples} × ${hp.seq_len} tokens (${job.calibration.source})`],
    ["Created", formatTime(job.created_at)],
    ["Ran for", job.started_at && job.finished_at ? formatDuration(job.finished_at - job.started_at) : "–"],
  ];
  return h("dl", { class: "details" }, rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function downloadLink(job, format, file) {
  const url = `/v1/quantization/jobs/${job.id}/result?file=${encodeURIComponent(file.filename)}${format === "mlx" ? "" : `&format=${format}`}`;
  const name = `${job.id}-${format === "mlx" ? "" : `${format}-`}${file.filename}`;
  const onclick = (event) => {
    if (!apiKey.get()) return; // a plain link works when the server has no key
    event.preventDefault();
    download(url, name).catch((e) => alert(`Download failed: ${e.message}`));
  };
  return h("li", {}, h("a", { href: url, download: name, onclick, dataset: { format } }, file.filename), ` ${formatBytes(file.bytes)}`);
}

function resultSection(job) {
  const total = job.result_files.reduce((n, f) => n + f.bytes, 0);
  const stats = job.stats || {};
  const formats = [["mlx", "Native (MLX layout)", job.result_files]];
  if (job.result_formats.includes("autoawq")) formats.push(["autoawq", "AutoAWQ GEMM", job.autoawq_result_files]);
  const chart = h("div", { class: "chart-slot" }, h("p", { class: "muted" }, "Loading quant_stats.json…"));
  api(`/v1/quantization/jobs/${job.id}/result?file=quant_stats.json`)
    .then((data) => chart.replaceChildren(blockErrorFigure(typeof data === "string" ? JSON.parse(data) : data)))
    .catch((e) => chart.replaceChildren(h("p", { class: "error" }, `Could not load the statistics: ${e.message}`)));
  return h("section", { class: "card", "aria-labelledby": "result-title" },
    h("h2", { id: "result-title" }, "Result"),
    h("p", { class: "result-size" }, `${formatBytes(total)} in ${job.result_files.length} files`,
      stats.bits_per_weight ? ` · ${Number(stats.bits_per_weight).toFixed(2)} bits per weight` : "",
      Number.isFinite(stats.blocks_awq) ? ` · AWQ kept in ${stats.blocks_awq} blocks, round-to-nearest in ${stats.blocks_rtn}` : ""),
    h("a", { class: "button", href: `#/chat?model=${encodeURIComponent(job.id)}` }, "Serve and chat"),
    formats.map(([format, title, files]) => h("div", { class: "downloads" }, h("h3", {}, title), h("ul", {}, files.map((f) => downloadLink(job, format, f))))),
    h("h3", {}, "Output error per block"),
    chart);
}

export function jobView(root, signal, jobId) {
  const heading = h("h1", {}, `Job ${jobId}`);
  const badge = h("span", { class: "status", id: "job-status", role: "status" });
  const progress = progressView("Job progress");
  const cancel = h("button", { type: "button", class: "danger", hidden: true }, "Cancel job");
  const error = h("p", { class: "error", role: "alert" });
  const info = h("div");
  const events = h("ol", { class: "events", role: "log", "aria-label": "Event log" });
  const result = h("div");
  root.append(heading,
    h("section", { class: "card" }, h("div", { class: "job-head" }, badge, cancel), progress.node, error, info),
    result,
    h("section", { class: "card", "aria-labelledby": "events-title" }, h("h2", { id: "events-title" }, "Events"), events));

  function show(job) {
    badge.textContent = job.status;
    badge.dataset.status = job.status;
    badge.className = `status status-${job.status}`;
    progress.update(job);
    cancel.hidden = !isActive(job) || job.cancel_requested;
    error.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
    info.replaceChildren(details(job));
    if (job.status === "succeeded" && !result.firstChild) result.append(resultSection(job));
  }

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      show(await api(`/v1/quantization/jobs/${jobId}/cancel`, { method: "POST" }));
    } catch (e) {
      error.textContent = e.message;
    } finally {
      cancel.disabled = false;
    }
  });

  api(`/v1/quantization/jobs/${jobId}`, { signal }).then((job) => {
    show(job);
    return watchJob(job, {
      signal,
      onEvent: (event, current) => {
        if (event) {
          events.append(eventItem(event));
          events.scrollTop = events.scrollHeight;
        }
        show(current);
      },
    });
  }).catch((e) => { if (!signal.aborted) error.textContent = e.message; });
}
