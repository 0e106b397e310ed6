// The cloud's dashboard: the round API (README "REST API") polled from the page, no build step.
// Every call of the round API, reads included, sends an admin's credential (a bearer token, e.g. admin.token).
"use strict";

const $ = (id) => document.getElementById(id);
const ACTIVE = ["pending", "running", "aggregating"];
const MB = 1e6;
let charts = {};
let activeRound = null;

function token() {
  return $("token").value.trim();
}

function headers(json) {
  const h = {};
  if (token()) h["authorization"] = "Bearer " + token();
  if (json) h["content-type"] = "application/json";
  return h;
}

function say(text, kind) {
  const m = $("message");
  m.textContent = text;
  m.className = kind || "";
}

// A failed call as a person should read it: the status, the service's reason, and what to do.
async function failure(resp) {
  let detail = resp.statusText;
  try {
    const body = await resp.json();
    detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) { /* not JSON */ }
  const hint = resp.status === 401 ? " — enter an admin credential (admin.token) above"
    : resp.status === 403 ? " — this credential may not start or cancel rounds: use an admin credential" : "";
  return `${resp.status} ${resp.statusText}: ${detail}${hint}`;
}

async function api(method, path, body) {
  const resp = await fetch(path, {method, headers: headers(body !== undefined),
                                  body: body === undefined ? undefined : JSON.stringify(body)});
  if (!resp.ok) throw new Error(await failure(resp));
  return resp.json();
}

function fmt(x, digits) {
  return x === undefined || x === null ? "–" : Number(x).toFixed(digits);
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function renderTable(rounds) {
  const body = $("rounds").querySelector("tbody");
  body.replaceChildren();
  for (const r of [...rounds].reverse()) {
    const m = r.metrics || {}, b = m.bytes || {}, ue = b.user_edge || {}, ec = b.edge_cloud || {};
    const tr = document.createElement("tr");
    tr.dataset.roundId = r.round_id;
    cell(tr, r.round_id);
    cell(tr, r.state + (r.error ? ` (${r.error})` : ""), "state " + r.state);
    cell(tr, r.version ?? "–");
    cell(tr, (r.participants || []).length);
    cell(tr, fmt(m.train_loss, 4));
    cell(tr, fmt(m.eval_loss, 4));
    cell(tr, "eval_accuracy" in m ? fmt(m.eval_accuracy, 4) : fmt(m.eval_perplexity, 2));
    cell(tr, ue.up === undefined ? "–" : `${fmt(ue.up / MB, 2)} / ${fmt(ue.down / MB, 2)}`);
    cell(tr, ec.up === undefined ? "–" : `${fmt(ec.up / MB, 2)} / ${fmt(ec.down / MB, 2)}`);
    cell(tr, fmt(m.seconds, 1));
    body.appendChild(tr);
  }
}

function chart(id, series, data) {
  const el = $(id);
  if (charts[id]) charts[id].destroy();
  const opts = {width: 380, height: 200, scales: {x: {time: false}},
                axes: [{label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500]}, {}],
                series: [{label: "round"}, ...series]};
  charts[id] = new uPlot(opts, data, el);
}

function renderCharts(rounds) {
  const done = rounds.filter((r) => r.state === "committed");
  const x = done.map((r) => r.round_id);
  const get = (f) => done.map((r) => { const v = f(r.metrics || {}); return v === undefined ? null : v; });
  const lm = done.some((r) => "eval_perplexity" in (r.metrics || {}));
  $("quality-caption").textContent = lm ? "Held-out perplexity per round" : "Held-out accuracy per round";
  $("quality-head").textContent = lm ? "perplexity" : "accuracy";
  chart("chart-loss", [{label: "train", stroke: "#3d6fe0"}, {label: "held-out", stroke: "#c9473d"}],
        [x, get((m) => m.train_loss), get((m) => m.eval_loss)]);
  chart("chart-quality", [{label: lm ? "perplexity" : "accuracy", stroke: "#1f7a3a"}],
        [x, get((m) => (lm ? m.eval_perplexity : m.eval_accuracy))]);
  const hop = (h, d) => get((m) => (m.bytes && m.bytes[h] ? m.bytes[h][d] / MB : undefined));
  chart("chart-bytes", [{label: "user-edge up", stroke: "#3d6fe0"}, {label: "user-edge down", stroke: "#8aa8ee"},
                        {label: "edge-cloud up", stroke: "#c9473d"}, {label: "edge-cloud down", stroke: "#e59a93"}],
        [x, hop("user_edge", "up"), hop("user_edge", "down"), hop("edge_cloud", "up"), hop("edge_cloud", "down")]);
}

function renderProgress(view) {
  const box = $("progress");
  box.replaceChildren();
  $("live-title").textContent = view ? `${view.round_id} (${view.state})` : "none";
  $("cancel").disabled = !view;
  if (!view) return;
  for (const [user, text] of Object.entries(view.progress || {})) {
    const name = document.createElement("span");
    name.textContent = user;
    const bar = document.createElement("progress");
    const m = /step (\d+)\/(\d+)/.exec(text);
    bar.max = m ? Number(m[2]) : 1;
    bar.value = m ? Number(m[1]) : (["reported", "evaluated"].includes(text) ? 1 : 0);
    const what = document.createElement("span");
    what.textContent = text;
    what.dataset.user = user;
    box.append(name, bar, what);
  }
}

async function refresh() {
  try {
    const h = await (await fetch("/healthz")).json();
    $("health").textContent = `version ${h.version} · ${h.edges} edges · ${h.users} users`;
  } catch (e) {
    $("health").textContent = "the cloud does not answer";
  }
  if (!token()) {
    $("live-title").textContent = "– enter an admin credential to see the rounds";
    return;
  }
  try {
    const {rounds} = await api("GET", "/v1/rounds");
    renderTable(rounds);
    renderCharts(rounds);
    const active = rounds.filter((r) => ACTIVE.includes(r.state)).pop();
    activeRound = active ? active.round_id : null;
    renderProgress(active ? await api("GET", `/v1/rounds/${active.round_id}`) : null);
  } catch (e) {
    say(e.message, "error");
  }
}

async function startRound() {
  const body = {};
  const steps = $("local-steps").value.trim();
  if (steps) body.local_steps = Number(steps);
  try {
    const r = await api("POST", "/v1/rounds", body);
    say(`round ${r.round_id} started from version ${r.base_version}`, "ok");
    sessionStorage.setItem("splitllm-token", token());
    refresh();
  } catch (e) {
    say(e.message, "error");
  }
}

async function cancelRound() {
  if (activeRound === null) return;
  try {
    const r = await api("POST", `/v1/rounds/${activeRound}/cancel`);
    say(`round ${r.round_id}: ${r.state}`, "ok");
    refresh();
  } catch (e) {
    say(e.message, "error");
  }
}

$("token").value = sessionStorage.getItem("splitllm-token") || "";
$("token").addEventListener("change", () => { sessionStorage.setItem("splitllm-token", token()); refresh(); });
$("start").addEventListener("click", startRound);
$("cancel").addEventListener("click", cancelRound);
refresh();
setInterval(refresh, 1000);
