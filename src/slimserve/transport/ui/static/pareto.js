// A Pareto plot in plain SVG: batch-1 latency (x) against quality (y) for one version's
// variants; the front joins the variants no other beats on both; degrade targets are filled.
const NS = "http://www.w3.org/2000/svg";
const W = 440, H = 260, PAD = { l: 56, r: 24, t: 28, b: 40 };

// Quality as the optimize report defines it: accuracy where known, else agreement.
export function quality(profile) {
  if (!profile) return null;
  if (typeof profile.accuracy === "number") return profile.accuracy;
  return typeof profile.agreement === "number" ? profile.agreement : null;
}

export function paretoFront(points) {
  return points.filter((p) => !points.some((q) => q !== p && q.x <= p.x && q.y >= p.y &&
    (q.x < p.x || q.y > p.y))).sort((a, b) => a.x - b.x);
}

export function pointsOf(units, report) {
  const fromReport = new Map();
  if (report) {
    for (const row of [...(report.variants || []), ...(report.earlier_variants || [])]) {
      fromReport.set(row.name, row.profile);
    }
  }
  const points = [];
  for (const u of units) {
    let profile = u.profile && Object.keys(u.profile).length ? u.profile : null;
    if (!u.variant && !profile && report) profile = { agreement: 1, ...report.original };
    if (u.variant && !profile) profile = fromReport.get(u.variant);
    const x = profile && profile.latency_ms_batch1, y = quality(profile);
    if (typeof x === "number" && typeof y === "number") {
      points.push({ x, y, name: u.variant || "(original)", original: !u.variant, target: u.degrade_target });
    }
  }
  return points;
}

function node(tag, attrs, text) {
  const n = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
}

function scale(values, lo, hi) {
  let min = Math.min(...values), max = Math.max(...values);
  if (min === max) { min -= Math.abs(min) * 0.1 || 1; max += Math.abs(max) * 0.1 || 1; }
  const pad = (max - min) * 0.08;
  min -= pad; max += pad;
  return { f: (v) => lo + ((v - min) / (max - min)) * (hi - lo), min, max };
}

export function paretoPlot(model, version, units, report) {
  const points = pointsOf(units, report);
  const svg = node("svg", { class: "pareto", width: W, height: H, viewBox: `0 0 ${W} ${H}`,
    "data-points": points.length, "data-targets": points.filter((p) => p.target).length });
  svg.append(node("text", { x: PAD.l, y: 15 }, `${model} v${version}: latency against quality`));
  if (!points.length) {
    svg.append(node("text", { x: PAD.l, y: H / 2 }, "no measured profiles (run slimserve optimize)"));
    return svg;
  }
  const sx = scale(points.map((p) => p.x), PAD.l, W - PAD.r);
  const sy = scale(points.map((p) => p.y), H - PAD.b, PAD.t);
  svg.append(node("line", { class: "axis", x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b }));
  svg.append(node("line", { class: "axis", x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: H - PAD.b }));
  for (const [v, anchor] of [[sx.min, "start"], [sx.max, "end"]]) {
    svg.append(node("text", { x: sx.f(v), y: H - PAD.b + 14, "text-anchor": anchor }, v.toPrecision(3)));
  }
  for (const v of [sy.min, sy.max]) {
    svg.append(node("text", { x: PAD.l - 4, y: sy.f(v) + 4, "text-anchor": "end" }, v.toPrecision(4)));
  }
  svg.append(node("text", { x: (W + PAD.l) / 2, y: H - 6, "text-anchor": "middle" }, "p50 latency at batch 1 (ms)"));
  svg.append(node("text", { x: 12, y: (H - PAD.b + PAD.t) / 2, transform: `rotate(-90 12 ${(H - PAD.b + PAD.t) / 2})`,
    "text-anchor": "middle" }, "quality"));
  const front = paretoFront(points);
  svg.append(node("polyline", { class: "front", points: front.map((p) => `${sx.f(p.x)},${sy.f(p.y)}`).join(" ") }));
  for (const p of points) {
    const cls = `point${p.original ? " original" : ""}${p.target ? " target" : ""}`;
    const dot = node("circle", { class: cls, cx: sx.f(p.x), cy: sy.f(p.y), r: 5, "data-name": p.name });
    dot.append(node("title", {}, `${p.name}: ${p.x} ms, quality ${p.y}${p.target ? " (degrade target)" : ""}`));
    svg.append(dot);
    // Labels of points in the right third go to their left, so that none is cut off.
    const left = sx.f(p.x) > W - (W - PAD.l) / 3;
    svg.append(node("text", { x: sx.f(p.x) + (left ? -7 : 7), y: sy.f(p.y) - 6,
      "text-anchor": left ? "end" : "start" }, p.name));
  }
  svg.append(node("text", { x: W - PAD.r, y: 15, "text-anchor": "end" }, "filled orange: degrade target"));
  return svg;
}
