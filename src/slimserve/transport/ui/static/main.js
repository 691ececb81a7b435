// The console's entry point: the key prompt, the session, the tabs.
import { HttpError, getJson, getKey, setKey } from "./api.js";
import { Live } from "./live.js";
import { renderModels } from "./models.js";
import { renderReports } from "./reports.js";
import { TryIt } from "./tryit.js";

const $ = (id) => document.getElementById(id);
const state = { session: null, models: [], reports: [], tab: "models", shown: "" };
let live = null;
let tryIt = null;

async function start() {
  let session;
  try {
    session = await getJson("/ui/api/session");
  } catch (err) {
    if (err instanceof HttpError && err.status === 401) {
      showPrompt(getKey() ? "That key was not accepted: " + err.message : "");
      setKey(null);
      return;
    }
    $("key-error").textContent = err.message;
    $("key-prompt").hidden = false;
    return;
  }
  state.session = session;
  $("key-prompt").hidden = true;
  $("tabs").hidden = false;
  $("forget").hidden = !session.keys_required;
  $("who").textContent = session.keys_required
    ? `key "${session.name}": ${session.scopes.join(", ")}`
    : "no API keys on this server";
  live = new Live(session);
  tryIt = new TryIt();
  show(state.tab);
  setInterval(refresh, 2000);
  live.start();
}

function showPrompt(message) {
  $("tabs").hidden = true;
  for (const section of document.querySelectorAll(".tab")) section.hidden = true;
  $("key-prompt").hidden = false;
  $("key-error").textContent = message;
  $("key-input").focus();
}

async function refresh() {
  const session = state.session;
  try {
    if (state.tab === "models" || state.tab === "try") {
      state.models = await getJson("/ui/api/models");
      // Drawn again only when something changed, so that open details stay open.
      const shown = JSON.stringify([state.tab, state.models, state.reports]);
      if (shown === state.shown) return;
      state.shown = shown;
      if (state.tab === "models") renderModels(state.models, state.reports, session, refresh);
      else tryIt.setModels(state.models);
    }
  } catch (err) {
    if (err instanceof HttpError && err.status === 401) return showPrompt(err.message);
    $("models").textContent = err.message;
  }
}

async function loadReports() {
  if (!state.session.scopes.includes("metrics")) return;
  try {
    state.reports = await getJson("/ui/api/reports");
  } catch (err) {
    $("reports").textContent = err.message;
    return;
  }
  if (state.tab === "reports") renderReports(state.reports, state.models);
}

async function show(tab) {
  state.tab = tab;
  for (const b of document.querySelectorAll("#tabs button")) {
    b.classList.toggle("active", b.dataset.tab === tab);
  }
  for (const section of document.querySelectorAll(".tab")) {
    section.hidden = section.id !== `tab-${tab}`;
  }
  if (tab === "reports" || tab === "models") await loadReports();
  await refresh();
  if (live) live.resize();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setKey($("key-input").value.trim());
  $("key-input").value = "";
  start();
});
$("forget").addEventListener("click", () => {
  setKey(null);
  location.reload();
});
for (const b of document.querySelectorAll("#tabs button")) {
  b.addEventListener("click", () => show(b.dataset.tab));
}
window.addEventListener("DOMContentLoaded", start);
