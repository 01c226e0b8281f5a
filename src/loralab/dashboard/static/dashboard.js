"use strict";
// The dashboard page: polls api/state (and api/curves) and redraws, without reloading.
// Every string from the workspace goes in with textContent, never innerHTML: it stays text.

const REFRESH_MS = Number(document.body.dataset.refreshMs) || 2000;
const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#9a6700", "#bf3989", "#0a7480", "#57606a"];
const SVG = "http://www.w3.org/2000/svg";
const shown = new Set();  // run ids whose curves were clicked on
let experiment = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function num(x, digits = 4) {
  return x === null || x === undefined ? "—" : Number(x).toFixed(digits);
}

function clock(s) {
  if (s === null || s === undefined) return "—";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, sec = s % 60;
  return `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}`;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function renderExperiments(st) {
  const select = document.getElementById("experiment");
  const have = [...select.options].map(o => o.value).join("\n");
  if (have !== st.experiments.join("\n")) {
    select.replaceChildren(...st.experiments.map(name => { const o = el("option", name); o.value = name; return o; }));
  }
  select.value = st.experiment || "";
  experiment = st.experiment;
}

function renderSweeps(st) {
  const section = document.getElementById("sweeps-section");
  section.hidden = st.sweeps.length === 0 && !st.sweep_error;
  const note = document.getElementById("sweep-error");
  note.textContent = st.sweep_error || "";
  note.hidden = !st.sweep_error;
  fill(document.querySelector("#sweeps tbody"), st.sweeps.map(s => {
    const tr = el("tr");
    tr.dataset.study = s.name;
    const best = s.best ? `${num(s.best.value)} (${s.best.trial})` : "—";
    const left = Object.entries(s.left).map(([k, v]) => `${v} ${k}`).join(", ") || "—";
    const cells = [[s.name, "name"], [s.trials, "trials"], [s.done, "done"], [s.pruned, "pruned"],
                   [s.running, "running"], [s.failed, "failed"], [best, "best"], [left, "left"], [clock(s.eta_s), "eta"]];
    for (const [text, cls] of cells) tr.append(el("td", text, cls));
    return tr;
  }));
}

function renderRuns(st) {
  const mine = st.runs.filter(r => r.experiment === st.experiment);
  fill(document.querySelector("#runs tbody"), mine.map(r => {
    const tr = el("tr", null, shown.has(r.id) ? "shown" : "");
    tr.dataset.id = r.id;
    tr.title = "click: show or hide its loss curve";
    tr.addEventListener("click", () => { shown.has(r.id) ? shown.delete(r.id) : shown.add(r.id); poll(false); });
    const progress = r.step === null ? "—" : (r.planned ? `${r.step}/${r.planned}` : String(r.step));
    tr.append(el("td", r.name, "name"), el("td", r.seed === null ? "" : r.seed),
              el("td", r.status + (r.gone ? " (process gone)" : ""), "status status-" + r.status), el("td", progress, "progress"),
              el("td", num(r.loss)), el("td", num(r.eval_loss)), el("td", r.eta_s === null ? "" : clock(r.eta_s)),
              el("td", r.updated), el("td", r.host || "", "host"), el("td", r.id.slice(0, 12)));
    return tr;
  }));
}

function renderCompare(st) {
  const table = document.getElementById("compare");
  const c = st.compare;
  if (!c) {
    table.tHead.replaceChildren();
    fill(table.tBodies[0], [el("tr")]);
    document.getElementById("legend").textContent = "No finished run in this experiment yet.";
    return;
  }
  const head = el("tr");
  c.head.forEach(h => head.append(el("th", h)));
  table.tHead.replaceChildren(head);
  fill(table.tBodies[0], c.rows.map(row => {
    const tr = el("tr", null, row.section ? "section" : "");
    if (row.section) {
      const td = el("td", row.section);
      td.colSpan = c.head.length;
      tr.append(td);
    } else {
      row.cells.forEach(x => tr.append(el("td", x)));
    }
    return tr;
  }));
  document.getElementById("legend").textContent = [c.legend, c.left_out].filter(Boolean).join(" ");
}

function renderCurves(curves, runs) {
  const box = document.getElementById("curves");
  const ids = Object.keys(curves);
  if (ids.length === 0) {
    box.replaceChildren(el("p", "No run is training now; click a run below to see its curve.", "hint"));
    return;
  }
  const W = 900, H = 300, L = 60, R = 200, T = 10, B = 30;
  const all = ids.flatMap(id => curves[id].loss.filter(v => v !== null));
  const steps = ids.flatMap(id => curves[id].step);
  let lo = Math.min(...all), hi = Math.max(...all);
  if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
  const s0 = Math.min(...steps), s1 = Math.max(Math.max(...steps), s0 + 1);
  const x = s => L + (s - s0) / (s1 - s0) * (W - L - R);
  const y = v => T + (hi - v) / (hi - lo) * (H - T - B);
  const chart = svg("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "training loss by step"});
  chart.append(svg("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#8c959f"}),
               svg("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#8c959f"}));
  for (let i = 0; i <= 4; i++) {
    const v = lo + (hi - lo) * i / 4, s = Math.round(s0 + (s1 - s0) * i / 4);
    chart.append(svg("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, v.toFixed(3)),
                 svg("text", {x: x(s), y: H - B + 16, "text-anchor": "middle"}, s));
  }
  chart.append(svg("text", {x: (W - R + L) / 2, y: H - 2, "text-anchor": "middle"}, "step"));
  const names = Object.fromEntries(runs.map(r => [r.id, r.seed === null ? r.name : `${r.name} seed ${r.seed}`]));
  ids.forEach((id, i) => {
    const c = curves[id], color = COLORS[i % COLORS.length];
    const points = c.step.map((s, j) => c.loss[j] === null ? null : `${x(s).toFixed(1)},${y(c.loss[j]).toFixed(1)}`)
                         .filter(Boolean).join(" ");
    const line = svg("polyline", {points, fill: "none", stroke: color, "stroke-width": 1.5});
    line.dataset.id = id;
    const last = c.step.length - 1;  // a dot where the run is now (a curve of one step is only this dot)
    const dot = c.loss[last] === null ? [] : [svg("circle", {cx: x(c.step[last]), cy: y(c.loss[last]), r: 3, fill: color})];
    chart.append(line, ...dot, svg("text", {x: W - R + 10, y: T + 14 + 16 * i, fill: color}, names[id] || id));
  });
  box.replaceChildren(chart);
}

function setStatus(text, error) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = error ? "error" : "";
}

let timer = null;
async function poll(again = true) {
  try {
    const q = experiment ? "?experiment=" + encodeURIComponent(experiment) : "";
    const got = await fetch("api/state" + q);
    const st = await got.json();
    if (!got.ok) throw new Error(st.error || `HTTP ${got.status}`);  // the workspace cannot be read now: say why
    renderExperiments(st);
    renderSweeps(st);
    renderRuns(st);
    renderCompare(st);
    const ids = st.runs.filter(r => r.experiment === st.experiment && (r.status === "running" || shown.has(r.id)))
                       .map(r => r.id);
    const curves = ids.length ? await (await fetch("api/curves?ids=" + ids.map(encodeURIComponent).join(","))).json() : {};
    renderCurves(curves, st.runs);
    setStatus(`updated ${st.time}`);
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (err) {
    setStatus(`cannot read the workspace server (${err.message}); retrying`, true);
  }
  if (again) { clearTimeout(timer); timer = setTimeout(poll, REFRESH_MS); }
}

document.getElementById("experiment").addEventListener("change", e => { experiment = e.target.value; poll(false); });
poll();
