// The API as the console uses it: the stored key as the bearer token, OpenAI-shaped errors
// turned into ApiError, and event streams read with fetch() (see sse.js).
import { readSSE } from "./sse.js";

const KEY_NAME = "mm-api-key";

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.param = error.param || null;
  }
}

export const apiKey = {
  get: () => localStorage.getItem(KEY_NAME) || "",
  set: (key) => localStorage.setItem(KEY_NAME, key),
  clear: () => localStorage.removeItem(KEY_NAME),
};

/** Called with the ApiError of any 401, so the page can ask for the key again. */
let onUnauthorized = () => {};
export function setUnauthorizedHandler(handler) { onUnauthorized = handler; }

export function authHeaders(extra = {}) {
  const key = apiKey.get();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const error = new ApiError(response.status, body);
  if (response.status === 401) onUnauthorized(error);
  return error;
}

/** fetch() a /v1 path with the key; JSON in (`json`) and out; ApiError on a non-2xx answer. */
export async function api(path, { method = "GET", json, body, headers = {}, signal } = {}) {
  const init = { method, headers: authHeaders(headers), signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

/**
 * Follow an SSE endpoint: onEvent(parsedJson, id) per event. `resume` makes it reconnect
 * (with Last-Event-ID) when the stream ends without [DONE], as the job events stream does
 * after an hour or when the network drops. Stops when `signal` aborts.
 */
export async function stream(path, { method = "GET", json, signal, onEvent, resume = false }) {
  let lastId = null;
  for (let attempt = 0; ; attempt++) {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastId) headers["Last-Event-ID"] = lastId;
    const init = { method, headers, signal };
    if (json !== undefined) {
      init.body = JSON.stringify(json);
      headers["Content-Type"] = "application/json";
    }
    let done = false;
    try {
      const response = await fetch(path, init);
      if (!response.ok) throw await failure(response);
      done = await readSSE(response, (event) => {
        if (event.id) lastId = event.id;
        const data = JSON.parse(event.data);
        if (data && data.error) throw new ApiError(0, data);
        onEvent(data, event.id);
      });
    } catch (error) {
      if (signal && signal.aborted) return false;
      if (!resume || error instanceof ApiError) throw error;
    }
    if (done || !resume || (signal && signal.aborted)) return done;
    await new Promise((resolve) => setTimeout(resolve, Math.min(5000, 500 * 2 ** attempt)));
  }
}

/** Upload a file to /v1/files with progress (fetch() cannot report upload progress). */
export function upload(file, purpose, onProgress) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("purpose", purpose);
    form.append("file", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/files");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded, e.total);
    xhr.onerror = () => reject(new ApiError(0, { error: { message: "the upload failed (network error)" } }));
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else {
        const error = new ApiError(xhr.status, body);
        if (xhr.status === 401) onUnauthorized(error);
        reject(error);
      }
    };
    xhr.send(form);
  });
}

/** Save a result file. With a key the link cannot carry it, so fetch it and save the blob. */
export async function download(url, filename) {
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) throw await failure(response);
  const blobUrl = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: blobUrl, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(blobUrl), 60000);
}
