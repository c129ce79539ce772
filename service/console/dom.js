// Small DOM and formatting helpers shared by the views (no framework: the pages are small).

/** h("a", {href: "#/"}, "text", child): an element; `on*` props become listeners. */
export function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

export function formatBytes(n) {
  if (!Number.isFinite(n)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export function formatTime(unixSeconds) {
  return unixSeconds ? new Date(unixSeconds * 1000).toLocaleString() : "–";
}

export function formatDuration(seconds) {
  if (!Number.isFinite(seconds)) return "–";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const m = Math.floor(seconds / 60);
  return m < 60 ? `${m} min ${Math.round(seconds % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** A labelled form field: <div class="field"><label for=id>…</label>control<small>hint</small></div>. */
export function field(label, control, hint) {
  const hintNode = hint ? h("small", { id: `${control.id}-hint` }, hint) : null;
  if (hintNode) control.setAttribute("aria-describedby", hintNode.id);
  return h("div", { class: "field" }, h("label", { for: control.id }, label), control, hintNode);
}

/** A <select> of [value, text] pairs. */
export function select(id, options, selected) {
  return h("select", { id, name: id },
    options.map(([value, text]) => h("option", { value: String(value), selected: String(value) === String(selected) }, text)));
}

/** The one place the console words a job's size settings: "4-bit, group 64, awq". */
export function describeSettings(hp) {
  const group = hp.group_size ? `group ${hp.group_size}` : "group auto";
  return `${hp.bits}-bit, ${group}, ${hp.method || "awq"}`;
}
