// The submit form: a served model or an uploaded .gguf file, and the job's settings.
import { api, upload } from "./api.js";
import { field, formatBytes, h, select } from "./dom.js";

const UPLOAD = "__upload__";

/** A random Idempotency-Key (crypto.randomUUID exists only on https or localhost pages). */
const randomKey = () => Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");

function numberInput(id, value, { min, max, step = 1 }) {
  return h("input", { id, name: id, type: "number", value: String(value), min: String(min), max: String(max), step: String(step), required: true, inputmode: "decimal" });
}

const uploadLabel = (file) => `${file.filename} (uploaded, ${formatBytes(file.bytes)})`;

/** Models a job can quantize: built-in and served ones (job results are already quantized). */
async function quantizableModels(signal) {
  const [models, files] = await Promise.all([
    api("/v1/models", { signal }),
    api("/v1/files?purpose=model", { signal }).catch(() => ({ data: [] })),
  ]);
  const names = models.data.map((m) => m.id).filter((id) => !id.startsWith("qjob-")).map((id) => [id, id]);
  const uploads = files.data.map((f) => [f.id, uploadLabel(f)]);
  return [...names, ...uploads, [UPLOAD, "Upload a .gguf file…"]];
}

export function submitForm({ signal, onSubmitted }) {
  const model = select("model", [["", "Loading models…"]], "");
  const file = h("input", { id: "model-file", name: "model-file", type: "file", accept: ".gguf" });
  const fileField = field("Model file (.gguf)", file, "Sent to the server's /v1/files, then quantized from there.");
  fileField.hidden = true;
  const uploadBar = h("progress", { max: 1, value: 0, "aria-label": "Upload progress", hidden: true });
  const bits = select("bits", [[4, "4 bits"], [3, "3 bits"], [2, "2 bits"], [8, "8 bits"]], 4);
  const group = select("group-size", [["", "Auto"], [32, "32"], [64, "64"], [128, "128"], [256, "256"]], "");
  const method = select("method", [["awq", "AWQ"], ["awq+round", "AWQ + learned rounding (slower)"], ["rtn", "Round-to-nearest (baseline)"]], "awq");
  const salient = numberInput("salient-ratio", 0, { min: 0, max: 0.49, step: 0.001 });
  const samples = numberInput("n-samples", 16, { min: 1, max: 1024 });
  const seqLen = numberInput("seq-len", 256, { min: 8, max: 4096 });
  const grid = numberInput("n-grid", 20, { min: 1, max: 100 });
  const autoawq = h("input", { id: "export-autoawq", name: "export-autoawq", type: "checkbox", checked: true });
  const autoawqHint = h("small", { id: "export-autoawq-hint" }, "Needs 4 bits and salient ratio 0.");
  autoawq.setAttribute("aria-describedby", autoawqHint.id);
  const status = h("p", { class: "form-status", role: "status" });
  const error = h("p", { class: "error", role: "alert" });
  const button = h("button", { type: "submit" }, "Quantize");

  const syncAutoawq = () => {
    const possible = bits.value === "4" && Number(salient.value) === 0;
    autoawq.disabled = !possible;
    if (!possible) autoawq.checked = false;
  };
  bits.addEventListener("change", syncAutoawq);
  salient.addEventListener("input", syncAutoawq);
  model.addEventListener("change", () => { fileField.hidden = model.value !== UPLOAD; file.required = model.value === UPLOAD; });

  quantizableModels(signal).then((options) => {
    model.replaceChildren(...options.map(([value, text]) => h("option", { value }, text)));
  }).catch((e) => { if (!signal.aborted) error.textContent = `Could not list the models: ${e.message}`; });

  async function chosenModel() {
    if (model.value !== UPLOAD) return model.value;
    const chosen = file.files[0];
    uploadBar.hidden = false;
    status.textContent = `Uploading ${chosen.name} (${formatBytes(chosen.size)})…`;
    const uploaded = await upload(chosen, "model", (sent, total) => { uploadBar.max = total; uploadBar.value = sent; });
    uploadBar.hidden = true;
    // pick the upload from now on: a retried submission (after a refused setting) does not send it again
    model.insertBefore(h("option", { value: uploaded.id }, uploadLabel(uploaded)), model.lastChild);
    model.value = uploaded.id;
    model.dispatchEvent(new Event("change"));
    return uploaded.id;
  }

  const form = h("form", { class: "card submit", "aria-labelledby": "submit-title", novalidate: false },
    h("h2", { id: "submit-title" }, "New quantization job"),
    field("Model", model), fileField, uploadBar,
    h("div", { class: "grid2" },
      field("Bits", bits), field("Group size", group, "Auto: the largest that divides the model's widths."),
      field("Method", method), field("Salient ratio", salient, "Input channels kept in fp16 (0: pure integer)."),
      field("Calibration samples", samples, "Sequences of built-in Wikipedia text."),
      field("Tokens per sample", seqLen)),
    h("details", {}, h("summary", {}, "More settings"), field("Scale-search grid points", grid)),
    h("div", { class: "check" }, autoawq, h("label", { for: autoawq.id }, "Also export AutoAWQ GEMM"), autoawqHint),
    button, status, error);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    button.disabled = true;
    try {
      const body = {
        model: await chosenModel(),
        bits: Number(bits.value),
        method: method.value,
        salient_ratio: Number(salient.value),
        n_samples: Number(samples.value),
        seq_len: Number(seqLen.value),
        n_grid: Number(grid.value),
        export_format: autoawq.checked ? "autoawq" : "mlx",
      };
      if (group.value) body.group_size = Number(group.value);
      // one key per submission: a double click or a retried request makes one job, not two
      const job = await api("/v1/quantization/jobs", { method: "POST", json: body, headers: { "Idempotency-Key": randomKey() } });
      status.replaceChildren("Submitted ", h("a", { href: `#/jobs/${job.id}` }, job.id), ".");
      onSubmitted(job);
    } catch (e) {
      status.textContent = "";
      error.textContent = e.param ? `${e.param}: ${e.message}` : e.message;
    } finally {
      uploadBar.hidden = true;
      button.disabled = false;
    }
  });
  syncAutoawq();
  return form;
}
