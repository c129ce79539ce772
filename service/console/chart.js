// The per-block error chart, drawn as plain SVG: for each transformer block, the output error
// of the stored (AWQ) block next to plain round-to-nearest's, on a log scale (errors grow by
// orders of magnitude from the first block to the last).
import { h } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const SERIES = [
  { key: "block_rtn_output_error", name: "Round-to-nearest", cls: "bar-rtn" },
  { key: "block_output_error", name: "AWQ", cls: "bar-awq" },
  { key: "block_round_output_error", name: "AWQ + learned rounding", cls: "bar-round" },
];

function s(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  node.append(...children);
  return node;
}

const fmt = (v) => (v >= 0.01 && v < 1000 ? v.toPrecision(3) : v.toExponential(2));

/** The series present in these blocks' stats (rounding only for awq+round jobs). */
export function seriesOf(blocks) {
  return SERIES.filter((series) => blocks.some((b) => Number.isFinite(b[series.key])));
}

/** An <svg> bar chart of blocks' output errors (one group of bars per block). */
export function blockErrorChart(blocks, { width = 720, height = 260 } = {}) {
  const series = seriesOf(blocks);
  const values = blocks.flatMap((b) => series.map((x) => b[x.key])).filter((v) => v > 0);
  const lo = Math.floor(Math.log10(Math.min(...values)));
  const hi = Math.ceil(Math.log10(Math.max(...values)));
  const top = hi === lo ? lo + 1 : hi;
  const pad = { left: 56, right: 8, top: 10, bottom: 34 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const y = (v) => pad.top + plotH * (1 - (Math.log10(Math.max(v, 10 ** lo)) - lo) / (top - lo));
  const slot = plotW / blocks.length;
  const barW = Math.max(1, (slot * 0.8) / series.length);

  const svg = s("svg", {
    viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img",
    "aria-label": `Output error per block, ${series.map((x) => x.name).join(" vs ")}, log scale`,
  });
  for (let p = lo; p <= top; p++) {
    const gy = y(10 ** p);
    svg.append(s("line", { x1: pad.left, x2: width - pad.right, y1: gy, y2: gy, class: "grid" }),
      s("text", { x: pad.left - 6, y: gy + 4, class: "tick", "text-anchor": "end" }, `1e${p}`));
  }
  blocks.forEach((block, i) => {
    const x0 = pad.left + i * slot + slot * 0.1;
    const group = s("g", { class: "block", "data-block": i });
    series.forEach((x, j) => {
      const v = block[x.key];
      const by = y(v);
      group.append(s("rect", { x: x0 + j * barW, y: by, width: barW, height: pad.top + plotH - by, class: x.cls },
        s("title", {}, `block ${i}: ${x.name} ${fmt(v)}`)));
    });
    svg.append(group);
    if (blocks.length <= 40 || i % 5 === 0) {
      svg.append(s("text", { x: x0 + (barW * series.length) / 2, y: height - pad.bottom + 14, class: "tick", "text-anchor": "middle" }, String(i)));
    }
  });
  svg.append(s("text", { x: pad.left + plotW / 2, y: height - 4, class: "axis", "text-anchor": "middle" }, "block"));
  return svg;
}

/** The chart with its legend, a one-line summary and the numbers as a table (for screen readers). */
export function blockErrorFigure(stats) {
  const blocks = stats.blocks || [];
  if (!blocks.length) return h("p", { class: "muted" }, "This result has no per-block statistics.");
  const series = seriesOf(blocks);
  const better = blocks.filter((b) => b.block_output_error < b.block_rtn_output_error).length;
  const ratios = blocks.map((b) => b.block_output_error / b.block_rtn_output_error).filter(Number.isFinite);
  const mean = ratios.reduce((a, r) => a + r, 0) / ratios.length;
  const legend = h("ul", { class: "legend" }, series.map((x) => h("li", {}, h("span", { class: `swatch ${x.cls}` }), x.name)));
  const table = h("table", {},
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Block"), series.map((x) => h("th", { scope: "col" }, x.name)), h("th", { scope: "col" }, "Kept"))),
    h("tbody", {}, blocks.map((b, i) => h("tr", {}, h("th", { scope: "row" }, String(i)), series.map((x) => h("td", {}, fmt(b[x.key]))), h("td", {}, b.choice || "")))));
  return h("figure", { class: "chart-figure" },
    blockErrorChart(blocks),
    legend,
    h("figcaption", {}, `AWQ's block output error is below round-to-nearest's in ${better} of ${blocks.length} blocks; `
      + `on average ${(mean * 100).toFixed(0)}% of it (lower is better; the worse of the two is never stored).`),
    h("details", {}, h("summary", {}, "The numbers"), h("div", { class: "table-wrap" }, table)));
}
