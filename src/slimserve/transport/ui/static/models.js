// Models tab: every model, version and variant with its state, residency and profile, a
// Pareto plot per version, and load/unload for keys with `manage`.
import { bytes, el, fmt, postJson, servedName } from "./api.js";
import { paretoPlot } from "./pareto.js";

const COLUMNS = [
  "version", "variant", "state", "resident", "cold load", "breaker", "size", "p50 / p99 b1 ms", "p50 best ms", "rows/s", "accuracy", "agreement", "recipe",
  "degrade to", "profile",
];
// Shown in their own columns; the profile cell lists the rest (latency per batch, errors...).
const SHOWN = new Set(["size_bytes", "latency_ms_batch1", "latency_ms_batch1_p99",
  "latency_ms_best", "best_batch", "throughput_rps", "accuracy", "agreement"]);

export function renderModels(models, reports, session, refresh) {
  const root = document.getElementById("models");
  root.replaceChildren(...models.map((m) => modelCard(m, reports, session, refresh)));
  if (!models.length) root.append(el("p", { class: "hint" }, "No models in the repository."));
}

function modelCard(model, reports, session, refresh) {
  const manage = session.scopes.includes("manage") && session.model_control;
  const card = el("div", { class: "card model", "data-model": model.name },
    el("header", {},
      el("h2", {}, model.name),
      el("span", { class: `state state-${model.state}` }, model.state),
      el("span", { class: "meta" },
        [model.backend, model.task].filter(Boolean).join(" · "),
        model.degraded_now ? " · degraded now" : ""),
      manage ? manageButtons(model, refresh) : null),
    // A model with units shows each unit's reason in its row; this is for one that has none
    // (an unreadable model.yaml, no version folder).
    model.reason && !model.units.length ? el("p", { class: "reason" }, model.reason) : null,
    el("p", { class: "meta" }, "inputs: ", tensors(model.inputs), " → outputs: ", tensors(model.outputs),
      `; degradation ${model.degrade_allowed ? "on by default" : "on request (degrade=true)"}, `,
      `quality budget ${model.max_quality_loss} point${model.max_quality_loss === 1 ? "" : "s"}`),
    el("div", { class: "scroll" }, unitTable(model)));
  const plots = el("div", { class: "row" });
  for (const version of new Set(model.units.map((u) => u.version))) {
    const report = reports.find((r) => r.model === model.name && r.version === String(version));
    const units = model.units.filter((u) => u.version === version);
    if (units.length > 1 || report) plots.append(paretoPlot(model.name, version, units, report));
  }
  card.append(plots);
  return card;
}

function profileDetails(profile) {
  const rest = Object.entries(profile).filter(([k]) => !SHOWN.has(k));
  if (!rest.length) return "";
  const text = (v) => (v !== null && typeof v === "object"
    ? Object.entries(v).map(([k, x]) => `${k}: ${typeof x === "number" ? fmt(x) : x}`).join(", ")
    : typeof v === "number" ? fmt(v, 4) : String(v));
  return el("details", {}, el("summary", {}, `${rest.length} more`),
    el("dl", {}, rest.map(([k, v]) => [el("dt", {}, k), el("dd", {}, text(v))])));
}

function seconds(s) {
  if (s === null || s === undefined) return "-";
  return s < 1 ? `${fmt(s * 1000)} ms` : `${fmt(s)} s`;
}

function tensors(specs) {
  return specs.map((s) => `${s.name} ${s.datatype} [${s.shape.join(", ")}]`).join(", ") || "-";
}

function unitTable(model) {
  const rows = model.units.map((u) => {
    const p = u.profile || {};
    return el("tr", { "data-unit": `${servedName(u)}/${u.version}` },
      el("td", {}, u.version),
      el("td", {}, u.variant || "(original)"),
      el("td", {}, el("span", { class: `state state-${u.state}` }, u.state),
        u.reason ? el("div", { class: "reason" }, u.reason) : null),
      el("td", { class: "num" }, u.resident ? bytes(u.resident_bytes) : "no"),
      el("td", { class: "num" }, seconds(u.cold_load_s)),
      el("td", { class: u.breaker === "open" ? "breaker-open" : "" }, u.breaker),
      el("td", { class: "num" }, bytes(p.size_bytes)),
      el("td", { class: "num" }, p.latency_ms_batch1_p99 === undefined ? fmt(p.latency_ms_batch1)
        : `${fmt(p.latency_ms_batch1)} / ${fmt(p.latency_ms_batch1_p99)}`),
      el("td", { class: "num" }, fmt(p.latency_ms_best),
        p.best_batch ? ` (batch ${p.best_batch})` : ""),
      el("td", { class: "num" }, fmt(p.throughput_rps)),
      el("td", { class: "num" }, fmt(p.accuracy, 4)),
      el("td", { class: "num" }, fmt(p.agreement, 4)),
      el("td", {}, u.recipe || ""),
      el("td", { class: u.degrade_target ? "target" : "" }, u.degrade_target ? "yes" : ""),
      el("td", {}, profileDetails(p)));
  });
  return el("table", { class: "grid units" },
    el("thead", {}, el("tr", {}, COLUMNS.map((c) => el("th", {}, c)))),
    el("tbody", {}, rows));
}

function manageButtons(model, refresh) {
  const out = el("span", { class: "meta" });
  const act = (action) => async () => {
    out.lastChild.textContent = `${action}ing...`;
    try {
      await postJson(`/v2/repository/models/${encodeURIComponent(model.name)}/${action}`, {});
      out.lastChild.textContent = `${action}ed`;
    } catch (err) {
      out.lastChild.textContent = err.message;
    }
    refresh();
  };
  out.append(
    el("button", { type: "button", class: "manage", onclick: act("load") }, "load"), " ",
    el("button", { type: "button", class: "manage", onclick: act("unload") }, "unload"), " ",
    el("span", { class: "manage-result" }, ""));
  return out;
}
