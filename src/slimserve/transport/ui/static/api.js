// Calls to the server with the API key (if any) as a bearer header; never in a URL.
const KEY = "slimserve.apiKey";

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY);
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export function headers(extra = {}) {
  const h = { ...extra };
  const key = getKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The server's own message: {"error": "..."} (v2) or {"error": {"message": ...}} (OpenAI).
export async function errorOf(response) {
  let text = await response.text();
  try {
    const doc = JSON.parse(text);
    const err = doc.error;
    text = typeof err === "string" ? err : (err && err.message) || text;
  } catch (_) { /* not JSON: show it as it came */ }
  return new HttpError(response.status, `${response.status}: ${text}`);
}

export async function request(method, path, body) {
  const init = { method, headers: headers(), cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = typeof body === "string" ? body : JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJson(path) {
  return (await request("GET", path)).json();
}

export async function postJson(path, body) {
  return (await request("POST", path, body)).json();
}

// Elements without innerHTML: text stays text, whatever a model or a server sends.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

export function fmt(value, digits = 3) {
  if (value === undefined || value === null || Number.isNaN(value)) return "-";
  if (typeof value !== "number") return String(value);
  if (value === 0) return "0";
  return Math.abs(value) >= 1000 ? value.toFixed(0) : value.toPrecision(digits);
}

export function bytes(n) {
  if (n === undefined || n === null) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function servedName(unit) {
  return unit.variant ? `${unit.model}:${unit.variant}` : unit.model;
}
