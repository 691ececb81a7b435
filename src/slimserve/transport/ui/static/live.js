// Live tab: polls /ui/api/live every second and turns two successive samples of cumulative
// counters and histogram buckets into rates and windowed quantiles (Prometheus' rate and
// histogram_quantile), shown in a table and in uPlot charts.
import { HttpError, bytes, el, fmt, getJson } from "./api.js";

const PERIOD_MS = 1000;
const HISTORY = 120; // points kept per series (two minutes)
const COLORS = ["#2f6fdf", "#d9822b", "#2c8a4b", "#c23b3b", "#7a4fd0", "#0f8fa3", "#b0477f", "#6b6b28"];
const BREAKER = ["closed", "half-open", "open"];
const CHARTS = { rps: "chart-rps", p99: "chart-p99", queue: "chart-queue", tokens: "chart-tokens" };

// The q-quantile of the observations between two cumulative histograms (le: upper bounds,
// null for +Inf), interpolating linearly inside the bucket; null without observations.
export function quantile(q, now, before) {
  if (!now) return null;
  const counts = now.counts.map((c, i) => c - (before ? before.counts[i] || 0 : 0));
  const total = counts[counts.length - 1];
  if (!(total > 0)) return null;
  const rank = q * total;
  for (let i = 0; i < counts.length; i++) {
    if (counts[i] >= rank) {
      const upper = now.le[i];
      const lower = i ? now.le[i - 1] : 0;
      if (upper === null) return lower; // in the +Inf bucket: the highest finite bound
      const below = i ? counts[i - 1] : 0;
      const inBucket = counts[i] - below;
      return lower + (upper - lower) * (inBucket > 0 ? (rank - below) / inBucket : 1);
    }
  }
  return null;
}

function delta(now, before, get) {
  return Math.max(0, get(now) - (before ? get(before) : 0));
}

export function figures(unit, before, seconds, modelRequests) {
  const h = unit.histograms, hb = before ? before.histograms : {};
  const dt = seconds > 0 ? seconds : 1;
  const requests = delta(unit, before, (u) => u.requests);
  const generated = delta(h.generation || { count: 0 }, hb.generation, (x) => x.count);
  const latency = h.latency && delta(h.latency, hb.latency, (x) => x.count) > 0 ? "latency" : "generation";
  const batchCount = h.batch ? delta(h.batch, hb.batch, (x) => x.count) : 0;
  const ms = (v) => (v === null ? null : v * 1000);
  return {
    rps: Math.max(requests, generated) / dt,
    p50: ms(quantile(0.5, h[latency], hb[latency])),
    p99: ms(quantile(0.99, h[latency], hb[latency])),
    queue: unit.queue_depth,
    batch: batchCount ? delta(h.batch, hb.batch, (x) => x.sum) / batchCount : null,
    degraded: modelRequests > 0 ? delta(unit, before, (u) => u.degraded) / modelRequests : null,
    errors: delta(unit, before, (u) => u.errors) / dt,
    breaker: BREAKER[unit.breaker] || String(unit.breaker),
    tokens: delta(unit, before, (u) => u.tokens) / dt,
    ttft: ms(quantile(0.5, h.ttft, hb.ttft)),
    running: unit.running,
    waiting: unit.waiting,
    llm: unit.generates,
  };
}

const key = (u) => `${u.model}:${u.variant}`;

export class Live {
  constructor(session) {
    this.enabled = session.scopes.includes("metrics");
    this.previous = null;
    this.times = [];
    this.series = new Map(); // unit key -> {rps: [], p99: [], queue: [], tokens: []}
    this.charts = {};
    this.chartKeys = "";
  }

  start() {
    if (!this.enabled) {
      document.getElementById("live-memory").textContent =
        "This key has no 'metrics' scope: live figures are not available to it.";
      return;
    }
    this.poll();
  }

  async poll() {
    try {
      this.update(await getJson("/ui/api/live"));
    } catch (err) {
      document.getElementById("live-memory").textContent = err.message;
      if (err instanceof HttpError && err.status === 401) return; // the key was revoked
    }
    setTimeout(() => this.poll(), PERIOD_MS);
  }

  update(sample) {
    const before = this.previous;
    this.previous = sample;
    if (!before) return;
    const seconds = sample.time_s - before.time_s;
    const known = new Map(before.units.map((u) => [key(u), u]));
    // A unit new in this sample counts from now: its totals so far are not this second's.
    const old = new Map(sample.units.map((u) => [key(u), known.get(key(u)) || u]));
    const perModel = new Map();
    for (const u of sample.units) {
      const d = delta(u, old.get(key(u)), (x) => Math.max(x.requests, x.histograms.generation ? x.histograms.generation.count : 0));
      perModel.set(u.model, (perModel.get(u.model) || 0) + d);
    }
    const rows = sample.units.map((u) => [u, figures(u, old.get(key(u)), seconds, perModel.get(u.model))]);
    this.renderTable(rows);
    document.getElementById("live-memory").textContent =
      `memory: ${bytes(sample.resident_bytes)} resident of a ${bytes(sample.memory_budget_bytes)} budget`;
    this.record(sample.time_s, rows);
  }

  renderTable(rows) {
    const pct = (v) => (v === null ? "-" : `${(v * 100).toFixed(0)}%`);
    const body = rows.map(([u, f]) => el("tr", { "data-unit": key(u) },
      el("td", {}, u.model), el("td", {}, u.variant || "(original)"),
      el("td", { class: "num rps" }, fmt(f.rps)), el("td", { class: "num" }, fmt(f.p50)),
      el("td", { class: "num" }, fmt(f.p99)), el("td", { class: "num" }, f.queue),
      el("td", { class: "num" }, fmt(f.batch)), el("td", { class: "num degraded" }, pct(f.degraded)),
      el("td", { class: "num" }, fmt(f.errors)),
      el("td", { class: f.breaker === "open" ? "breaker-open" : "" }, f.breaker),
      el("td", { class: "num tokens" }, f.llm ? fmt(f.tokens) : "-"),
      el("td", { class: "num" }, f.llm ? fmt(f.ttft) : "-"),
      el("td", { class: "num" }, f.llm ? f.running : "-"),
      el("td", { class: "num" }, f.llm ? f.waiting : "-")));
    document.querySelector("#live-table tbody").replaceChildren(...body);
  }

  record(time, rows) {
    this.times.push(time);
    const n = this.times.length;
    for (const [u, f] of rows) {
      let s = this.series.get(key(u));
      if (!s) {
        s = { llm: f.llm, rps: [], p99: [], queue: [], tokens: [] };
        for (const name of Object.keys(CHARTS)) s[name] = new Array(n - 1).fill(null);
        this.series.set(key(u), s);
      }
      for (const name of Object.keys(CHARTS)) s[name].push(f[name] ?? null);
    }
    for (const s of this.series.values()) {
      for (const name of Object.keys(CHARTS)) while (s[name].length < n) s[name].push(null);
    }
    if (n > HISTORY) {
      this.times.shift();
      for (const s of this.series.values()) for (const name of Object.keys(CHARTS)) s[name].shift();
    }
    this.draw();
  }

  draw() {
    if (typeof uPlot === "undefined") return;
    const keys = [...this.series.keys()];
    if (keys.join("|") !== this.chartKeys) this.rebuild(keys);
    for (const [name, chart] of Object.entries(this.charts)) {
      const used = keys.filter((k) => name !== "tokens" || this.series.get(k).llm);
      const data = [this.times.slice(), ...used.map((k) => this.series.get(k)[name].slice())];
      chart.setData(data);
      const values = data.slice(1).flat().filter((v) => typeof v === "number");
      // For people reading the DOM (and the browser tests): what the chart shows now.
      chart.root.parentElement.dataset.max = values.length ? Math.max(...values) : 0;
      chart.root.parentElement.dataset.points = this.times.length;
    }
  }

  rebuild(keys) {
    this.chartKeys = keys.join("|");
    for (const [name, id] of Object.entries(CHARTS)) {
      if (this.charts[name]) this.charts[name].destroy();
      const target = document.getElementById(id);
      const used = keys.filter((k) => name !== "tokens" || this.series.get(k).llm);
      const series = [{}, ...used.map((k) => ({
        label: k.endsWith(":") ? k.slice(0, -1) : k,
        stroke: COLORS[keys.indexOf(k) % COLORS.length], width: 2, spanGaps: true,
      }))];
      const opts = { width: this.width(target), height: 200, series, scales: { x: { time: true } },
        axes: [{}, { size: 60 }], legend: { live: false } };
      this.charts[name] = new uPlot(opts, [this.times.slice(), ...used.map((k) => this.series.get(k)[name].slice())], target);
    }
  }

  width(target) {
    return Math.max(320, (target.clientWidth || target.parentElement.clientWidth || 460) - 8);
  }

  resize() {
    for (const [name, chart] of Object.entries(this.charts)) {
      chart.setSize({ width: this.width(document.getElementById(CHARTS[name])), height: 200 });
    }
  }
}
