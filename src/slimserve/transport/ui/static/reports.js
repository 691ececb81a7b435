// Reports tab: each optimize report (NAME/reports/VERSION/report.json) as a table, its own
// plot (report.png, fetched with the key and shown from a blob: URL) and a Pareto plot.
import { bytes, el, fmt, request } from "./api.js";
import { paretoPlot } from "./pareto.js";

const COLUMNS = [
  ["size_bytes", "size", bytes], ["latency_ms_batch1", "p50 b1 ms", fmt],
  ["latency_ms_best", "p50 best ms", fmt], ["throughput_rps", "rows/s", fmt],
  ["accuracy", "accuracy", (v) => fmt(v, 4)], ["agreement", "agreement", (v) => fmt(v, 4)],
  ["max_abs_error", "max |err|", fmt],
];
const urls = [];

export function renderReports(reports, models) {
  while (urls.length) URL.revokeObjectURL(urls.pop());
  const root = document.getElementById("reports");
  if (!reports.length) {
    root.replaceChildren(el("p", { class: "hint" },
      "No reports yet: `slimserve optimize NAME` writes one under NAME/reports/VERSION/."));
    return;
  }
  root.replaceChildren(...reports.map((r) => reportCard(r, models)));
}

function reportCard(report, models) {
  const card = el("div", { class: "card report", "data-report": `${report.model}/${report.version}` },
    el("header", {}, el("h2", {}, `${report.model} version ${report.version}`)));
  if (report.error) {
    card.append(el("p", { class: "error" }, report.error));
    return card;
  }
  const rows = [
    { name: "(original)", recipe: "", profile: report.original || {} },
    ...(report.variants || []), ...(report.earlier_variants || []),
  ];
  card.append(el("table", { class: "grid" },
    el("thead", {}, el("tr", {}, el("th", {}, "variant"), el("th", {}, "recipe"),
      COLUMNS.map(([, label]) => el("th", {}, label)))),
    el("tbody", {}, rows.map((row) => el("tr", {},
      el("td", {}, row.name), el("td", {}, el("code", {}, row.recipe || "")),
      COLUMNS.map(([k, , f]) => el("td", { class: "num" }, f((row.profile || {})[k]))))))));
  const plots = el("div", { class: "row" });
  const model = models.find((m) => m.name === report.model);
  const units = model ? model.units.filter((u) => String(u.version) === report.version) : [];
  plots.append(paretoPlot(report.model, report.version, units.length ? units : unitsOf(report), report));
  if (report.plot) plots.append(plotImage(report));
  card.append(plots);
  return card;
}

// Without the model served, the report's own rows stand in for its units.
function unitsOf(report) {
  return [{ variant: null, profile: {} },
    ...(report.variants || []).map((v) => ({ variant: v.name, profile: v.profile }))];
}

function plotImage(report) {
  const img = el("img", { class: "report-plot", alt: `${report.model} report plot` });
  const path = `/ui/api/reports/${encodeURIComponent(report.model)}/${report.version}/plot`;
  request("GET", path).then((r) => r.blob()).then((blob) => {
    const url = URL.createObjectURL(blob);
    urls.push(url);
    img.src = url;
  }).catch((err) => img.replaceWith(el("p", { class: "error" }, err.message)));
  return img;
}
