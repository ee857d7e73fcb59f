// convserve web page: predict with feature maps, start and watch training jobs, and chart a
// job's diagnostics live beside another job's.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;          // GET /v1/model
let schema = null;         // GET /v1/train-schema
let lastStats = {};        // per block: {mean: [...], max: [...]}
const seenPromotions = new Set();

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error(`the server did not answer (${err.message})`);
  }
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!response.ok) {
    throw new Error(explain(response.status, body, text));
  }
  return body;
}

function explain(status, body, text) {
  const detail = body && (body.detail ?? body.error);
  if (Array.isArray(detail)) {
    return `${status}: ` + detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return `${status}: ${detail || text || "error"}`;
}

function show(id, message) {
  const el = $(id);
  el.textContent = message || "";
  el.hidden = !message;
}

// ---- model -----------------------------------------------------------------
async function loadModel() {
  try {
    model = await api("/v1/model");
    const alias = model.alias ? ` @${model.alias}` : "";
    const device = model.providers.includes("CUDAExecutionProvider") ? "GPU" : "CPU";
    $("model-line").textContent =
      `Model ${model.name} version ${model.version}${alias} on ${device} (${model.providers[0]}), ` +
      `input ${model.input.shape.slice(1).join("x")}, ${model.labels.length} classes`;
    const digits = model.input.shape[1] === 1 && model.labels.join("") === "0123456789";
    $("draw-box").hidden = !digits;
  } catch (err) {
    model = null;
    $("model-line").textContent = `No model is being served: ${err.message}`;
  }
}

// ---- predict ---------------------------------------------------------------
async function predict(blob, name) {
  show("predict-error", "");
  const form = () => { const f = new FormData(); f.append("file", blob, name); return f; };
  try {
    const [pngs, stats] = await Promise.all([
      api("/predict?top_k=5&feature_maps=all&format=png", { method: "POST", body: form() }),
      api("/predict?top_k=1&feature_maps=all&format=stats", { method: "POST", body: form() }),
    ]);
    lastStats = stats.predictions[0].feature_maps || {};
    render(pngs.predictions[0]);
  } catch (err) {
    $("result").hidden = true;
    show("predict-error", `Prediction failed: ${err.message}`);
  }
}

function render(prediction) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const c of prediction.top_k) {
    const li = document.createElement("li");
    const pct = (100 * c.probability).toFixed(1);
    li.innerHTML = `<span class="label"></span> ${pct}%<span class="bar"></span>`;
    li.querySelector(".label").textContent = c.label;
    li.querySelector(".bar").style.width = `${Math.max(1, 2 * pct)}px`;
    li.setAttribute("aria-label", `${c.label}: ${pct} percent`);
    bars.appendChild(li);
  }
  const maps = $("maps");
  maps.replaceChildren();
  for (const [block, fmap] of Object.entries(prediction.feature_maps || {})) {
    maps.appendChild(renderBlock(block, fmap));
  }
  $("zoom").hidden = true;
  $("result").hidden = false;
}

function renderBlock(block, fmap) {
  const wrap = document.createElement("div");
  wrap.className = "block";
  const g = fmap.grid;
  const title = document.createElement("h4");
  title.textContent = `${block}: ${g.channels} channels of ${g.tile_height}x${g.tile_width}`;
  const grid = document.createElement("div");
  grid.className = "grid";
  grid.style.gridTemplateColumns = `repeat(${g.cols}, minmax(0, 48px))`;
  const img = new Image();
  img.onload = () => {
    for (let c = 0; c < g.channels; c++) {
      const tile = document.createElement("button");
      tile.type = "button";
      tile.className = "tile";
      tile.setAttribute("aria-label", `${block} channel ${c}`);
      const canvas = document.createElement("canvas");
      canvas.width = g.tile_width;
      canvas.height = g.tile_height;
      const x = (c % g.cols) * g.tile_width;
      const y = Math.floor(c / g.cols) * g.tile_height;
      canvas.getContext("2d").drawImage(img, x, y, g.tile_width, g.tile_height, 0, 0,
                                        g.tile_width, g.tile_height);
      canvas.style.width = "100%";
      canvas.style.imageRendering = "pixelated";
      tile.appendChild(canvas);
      const zoom = () => showZoom(block, c, canvas);
      tile.addEventListener("click", zoom);
      tile.addEventListener("focus", zoom);
      tile.addEventListener("mouseenter", zoom);
      grid.appendChild(tile);
    }
  };
  img.src = `data:image/png;base64,${fmap.png}`;
  wrap.append(title, grid);
  return wrap;
}

function showZoom(block, channel, source) {
  const canvas = $("zoom-canvas");
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(source, 0, 0, canvas.width, canvas.height);
  const s = lastStats[block];
  const stats = s ? `mean ${s.mean[channel].toFixed(4)}, max ${s.max[channel].toFixed(4)}` : "";
  $("zoom-text").textContent = `${block}, channel ${channel}: ${stats}`;
  $("zoom").hidden = false;
}

function setupPredict() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    const f = e.target.files[0];
    if (f) predict(f, f.name);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) predict(f, f.name);
  });
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height); };
  clear();
  let drawing = false;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  };
  canvas.addEventListener("pointerdown", (e) => { drawing = true; ctx.beginPath(); ctx.moveTo(...at(e)); });
  canvas.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 22; ctx.lineCap = "round";
    ctx.lineTo(...at(e)); ctx.stroke();
  });
  window.addEventListener("pointerup", () => { drawing = false; });
  $("clear").addEventListener("click", clear);
  $("predict-drawing").addEventListener("click", () => {
    canvas.toBlob((blob) => predict(blob, "drawing.png"), "image/png");
  });
}

// ---- train -----------------------------------------------------------------
// Fields generated from the schema: [section, field, how to read the input].
const FIELDS = [
  ["data", "name"], ["data", "limit"], ["model", "activation"], ["model", "hidden", "list"],
  ["init", "name"], ["init", "std"], ["init", "value"], ["init", "scale"],
  ["optim", "optimizer"], ["optim", "lr"], ["optim", "epochs"],
];

function resolve(ref) {
  return schema.schema.$defs[ref.split("/").pop()];
}

function fieldSchema(section, name) {
  const sec = resolve(schema.schema.properties[section].$ref || schema.schema.properties[section].allOf[0].$ref);
  let prop = sec.properties[name];
  if (prop.anyOf) prop = { ...prop, ...prop.anyOf.find((p) => p.type !== "null") };
  return prop;
}

function buildForm() {
  const fields = $("fields");
  const channels = document.createElement("label");
  channels.innerHTML = `conv blocks (channels, comma separated) <input id="f-blocks" value="16,32">`;
  fields.appendChild(channels);
  const poolEnum = resolve("#/$defs/BlockConfig").properties.pool.enum;
  const pool = document.createElement("label");
  pool.innerHTML = `pooling <select id="f-pool">${poolEnum.map((p) => `<option>${p}</option>`).join("")}</select>`;
  fields.appendChild(pool);
  for (const [section, name, kind] of FIELDS) {
    const prop = fieldSchema(section, name);
    const label = document.createElement("label");
    label.textContent = `${section}.${name} `;
    let input;
    if (prop.enum) {
      input = document.createElement("select");
      for (const v of prop.enum) input.appendChild(new Option(v, v));
    } else {
      input = document.createElement("input");
      input.type = kind === "list" ? "text" : (prop.type === "integer" || prop.type === "number") ? "number" : "text";
      if (prop.type === "number") input.step = "any";
      if (prop.minimum !== undefined) input.min = prop.minimum;
    }
    input.id = `f-${section}-${name}`;
    label.appendChild(input);
    fields.appendChild(label);
  }
  const preset = $("preset");
  for (const name of Object.keys(schema.presets)) preset.appendChild(new Option(name, name));
  preset.addEventListener("change", () => fill(schema.presets[preset.value]));
  fill(schema.presets[preset.value]);
}

function fill(cfg) {
  $("f-blocks").value = cfg.model.blocks.map((b) => b.out_channels).join(",");
  $("f-pool").value = cfg.model.blocks.length ? cfg.model.blocks[0].pool : "max";
  for (const [section, name, kind] of FIELDS) {
    const v = cfg[section][name];
    $(`f-${section}-${name}`).value = kind === "list" ? v.join(",") : (v ?? "");
  }
}

function readForm() {
  const cfg = JSON.parse(JSON.stringify(schema.presets[$("preset").value]));
  const numbers = (text) => text.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const pool = $("f-pool").value;
  cfg.model.blocks = numbers($("f-blocks").value).map((c, i) => ({
    ...(cfg.model.blocks[i] || {}), out_channels: c, pool }));
  for (const [section, name, kind] of FIELDS) {
    const raw = $(`f-${section}-${name}`).value;
    const prop = fieldSchema(section, name);
    if (kind === "list") cfg[section][name] = numbers(raw);
    else if (raw === "") cfg[section][name] = null;
    else cfg[section][name] = (prop.type === "integer" || prop.type === "number") ? Number(raw) : raw;
  }
  delete cfg.tracking;
  return cfg;
}

function token() {
  return $("token").value.trim();
}

async function submitJob(e) {
  e.preventDefault();
  show("train-error", "");
  sessionStorage.setItem("convserve-token", token());
  try {
    await api("/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token()}` },
      // A job promotes into the registered model this page serves, when it follows one.
      body: JSON.stringify({ train: readForm(), promote: true,
                             ...(model && model.alias ? { model_name: model.name } : {}) }),
    });
    await refreshJobs();
  } catch (err) {
    show("train-error", `The job was not started: ${err.message}`);
  }
}

async function cancelJob(id) {
  try {
    await api(`/jobs/${id}`, { method: "DELETE", headers: { Authorization: `Bearer ${token()}` } });
    await refreshJobs();
  } catch (err) {
    show("train-error", `Cancelling failed: ${err.message}`);
  }
}

async function refreshJobs() {
  let page;
  try {
    page = await api("/jobs?page_size=20");
  } catch (err) {
    show("train-error", `Jobs could not be listed: ${err.message}`);
    return;
  }
  const body = $("jobs").querySelector("tbody");
  body.replaceChildren();
  for (const job of page.jobs) {
    const tr = document.createElement("tr");
    tr.dataset.id = job.id;
    tr.dataset.status = job.status;
    const p = job.progress;
    const acc = job.metrics.val_accuracy;
    tr.innerHTML = `<td></td><td class="status"></td><td></td><td></td><td></td><td></td>`;
    const [idCell, statusCell, progressCell, accCell, verdictCell, actions] = tr.children;
    idCell.textContent = job.id.slice(0, 8);
    if (job.links.mlflow) {
      const a = document.createElement("a");
      a.href = job.links.mlflow; a.textContent = " MLflow run"; a.target = "_blank";
      idCell.appendChild(a);
    }
    statusCell.textContent = job.status + (job.error ? `: ${job.error}` : "");
    if (p.total) {
      const bar = document.createElement("progress");
      bar.max = p.total; bar.value = p.step || 0;
      bar.setAttribute("aria-label", `step ${p.step || 0} of ${p.total}`);
      progressCell.append(bar, ` epoch ${p.epoch ?? 0}`);
    }
    accCell.textContent = acc === undefined ? "" : acc.toFixed(3);
    showDiagnosis(verdictCell, job.diagnosis);
    if (job.status === "scheduled" || job.status === "running") {
      const b = document.createElement("button");
      b.type = "button"; b.textContent = "Cancel";
      b.setAttribute("aria-label", `Cancel job ${job.id.slice(0, 8)}`);
      b.addEventListener("click", () => cancelJob(job.id));
      actions.appendChild(b);
    }
    const watch = document.createElement("button");
    watch.type = "button"; watch.textContent = "Diagnose";
    watch.setAttribute("aria-label", `Diagnose job ${job.id.slice(0, 8)}`);
    watch.addEventListener("click", () => {
      $("diag-a").value = job.id;
      refreshDiagnosis();
      $("diagnose").scrollIntoView({ behavior: "smooth" });
    });
    actions.appendChild(watch);
    body.appendChild(tr);
    if (job.promoted && job.registered_version && !seenPromotions.has(job.id)) {
      seenPromotions.add(job.id);
      announce(job);
    }
  }
  updatePickers(page.jobs);
}

// ---- diagnosis: live charts of a job's statistics, and a second job beside it -------------
// Statistics charted, in order: [metric name, title, log scale].
const CHARTS = [
  ["grad_std", "gradient std (back-propagated, per layer)", true],
  ["act_std", "activation std", true],
  ["dead", "dead share (ReLU units silent on the batch)", false],
  ["saturated", "saturated share (sigmoid/tanh at an asymptote)", false],
  ["update_ratio", "update / weight norm per step", true],
  ["distinct", "distinct filters share", false],
];
const RATIOS = [["grad_ratio", "gradient ratio, first / last hidden layer", true],
                ["act_growth", "activation growth, last / first hidden layer", true]];
let diagTimer = null;
let diagBusy = false;

let pickerState = "";
function updatePickers(jobs) {
  // Rebuilt only when the jobs or their states change: rebuilding closes an open list.
  const state = jobs.map((j) => `${j.id}:${j.status}`).join(",");
  const changed = state !== pickerState;
  if (changed) rebuildPickers(jobs);
  pickerState = state;
  if (changed || !diagTimer) refreshDiagnosis();  // a new job, or one that changed state
}

function rebuildPickers(jobs) {
  for (const id of ["diag-a", "diag-b"]) {
    const select = $(id);
    const current = select.value;
    const keep = id === "diag-b" ? [select.options[0]] : [];
    select.replaceChildren(...keep);
    for (const job of jobs) select.appendChild(new Option(`${job.id.slice(0, 8)} (${job.status})`, job.id));
    if ([...select.options].some((o) => o.value === current)) select.value = current;
  }
  const a = $("diag-a");
  if (!a.dataset.chosen && jobs.length) {
    const running = jobs.find((j) => j.status === "running");
    a.value = (running || jobs[0]).id;
  }
}

async function refreshDiagnosis() {
  if (diagBusy) return;
  const ids = [$("diag-a").value, $("diag-b").value].filter(Boolean);
  if (!ids.length) return;
  diagBusy = true;
  clearTimeout(diagTimer);
  try {
    const runs = await Promise.all(ids.map((id) => api(`/jobs/${id}/diagnostics`)));
    show("diag-error", "");
    renderDiagnostics(runs);
    const live = runs.some((r) => r.status === "running" || r.status === "scheduled");
    diagTimer = setTimeout(refreshDiagnosis, live ? 2000 : 15000);
  } catch (err) {
    show("diag-error", `Diagnostics could not be read: ${err.message}`);
    diagTimer = setTimeout(refreshDiagnosis, 5000);
  } finally {
    diagBusy = false;
  }
}

function renderDiagnostics(runs) {
  const view = $("diag-view");
  view.replaceChildren();
  view.style.setProperty("--columns", runs.length);
  const cards = document.createElement("div");
  cards.className = "diag-row";
  for (const run of runs) cards.appendChild(diagnosisCard(run));
  const charts = document.createElement("div");
  charts.className = "diag-charts";
  view.append(cards, charts);
  const rows = [...CHARTS, ...RATIOS].filter(([key]) =>
    runs.some((r) => seriesOf(r, key).some((s) => s.values.length)));
  // One cell per statistic, holding each job's chart side by side on one scale.
  const lastStep = Math.max(1, ...runs.flatMap((r) =>
    [...CHARTS, ...RATIOS].flatMap(([key]) => seriesOf(r, key).flatMap((s) => s.steps))));
  for (const [key, title, log] of rows) {
    const all = runs.map((r) => seriesOf(r, key));
    const range = extent(all.flat().flatMap((s) => s.values), log);
    const cell = document.createElement("figure");
    cell.className = "chart";
    cell.dataset.stat = key;
    const caption = document.createElement("figcaption");
    caption.textContent = title;
    const row = document.createElement("div");
    row.className = "diag-row";
    runs.forEach((run, i) => row.appendChild(chart(title, all[i], range, log, lastStep, run)));
    cell.append(caption, row);
    charts.appendChild(cell);
  }
}

function tick(v) {
  const a = Math.abs(v);
  return a !== 0 && (a < 0.01 || a >= 1000) ? v.toExponential(0) : String(Number(v.toPrecision(2)));
}

function seriesOf(run, key) {
  if (key in run.ratios) return [{ layer: key, ...run.ratios[key] }];
  const byLayer = run.statistics[key] || {};
  return run.layers.filter((l) => l in byLayer).map((l) => ({ layer: l, ...byLayer[l] }));
}

function extent(values, log) {
  let v = values.filter((x) => x !== null && Number.isFinite(x) && (!log || x > 0));
  if (!v.length) return log ? [1e-3, 1] : [0, 1];
  let lo = Math.min(...v), hi = Math.max(...v);
  if (!log) return [Math.min(0, lo), Math.max(1, hi)];
  if (hi / lo < 10) { lo /= 3; hi *= 3; }
  return [lo, hi];
}

function diagnosisCard(run) {
  const card = document.createElement("div");
  card.className = "diag-card";
  card.dataset.id = run.id;
  const h = document.createElement("h3");
  h.textContent = `${run.id.slice(0, 8)} ${run.name || ""} (${run.status})`;
  card.appendChild(h);
  const d = run.diagnosis;
  const p = document.createElement("p");
  p.className = "diag-verdict";
  if (!d) {
    p.textContent = run.layers.length ? "No diagnosis yet." : "No snapshot yet.";
  } else {
    const b = document.createElement("strong");
    b.className = `verdict ${d.verdict}`;
    b.textContent = d.verdict;
    p.append(b, ` (${d.summary})`);
  }
  card.appendChild(p);
  if (d) {
    const list = document.createElement("ul");
    for (const [label, text] of [["evidence", d.evidence], ...d.consequences.map((c) => ["consequence", c]), ["advice", d.advice]]) {
      if (!text) continue;
      const li = document.createElement("li");
      const b = document.createElement("b");
      b.textContent = `${label}: `;
      li.append(b, text);
      list.appendChild(li);
    }
    card.appendChild(list);
  }
  return card;
}

const SVG = "http://www.w3.org/2000/svg";
function el(name, attrs) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

// One small chart: a line per layer over steps, dark (input side) to light (output side).
function chart(title, series, [lo, hi], log, lastStep, run) {
  const box = document.createElement("div");
  const W = 300, H = 140, L = 34, R = 6, T = 6, B = 18;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const x0 = 0, x1 = lastStep;
  const f = log ? Math.log10 : (v) => v;
  const x = (s) => L + ((s - x0) / (x1 - x0 || 1)) * (W - L - R);
  const y = (v) => T + (1 - (f(v) - f(lo)) / (f(hi) - f(lo) || 1)) * (H - T - B);
  svg.appendChild(el("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "plot" }));
  for (const v of [lo, hi]) {
    const t = el("text", { x: L - 3, y: y(v) + 3, "text-anchor": "end", class: "tick" });
    t.textContent = tick(v);
    svg.appendChild(t);
  }
  const t = el("text", { x: W - R, y: H - 4, "text-anchor": "end", class: "tick" });
  t.textContent = `${run.id.slice(0, 8)}, step ${x1}`;
  svg.appendChild(t);
  series.forEach((s, i) => {
    const points = s.steps.map((st, j) => [st, s.values[j]])
      .filter(([, v]) => v !== null && (!log || v > 0));
    if (!points.length) return;
    const shade = series.length > 1 ? Math.round(25 + (55 * i) / (series.length - 1)) : 40;
    const colour = `hsl(215 70% ${shade}%)`;
    const line = el("polyline", {
      points: points.map(([st, v]) => `${x(st).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
      stroke: colour, fill: "none", "stroke-width": 1.5,
    });
    const tip = el("title", {});
    const [lastStep, lastValue] = points[points.length - 1];
    tip.textContent = `${s.layer}: ${lastValue.toPrecision(3)} at step ${lastStep}`;
    line.appendChild(tip);
    svg.appendChild(line);
    for (const [st, v] of points.length < 40 ? points : []) {
      svg.appendChild(el("circle", { cx: x(st).toFixed(1), cy: y(v).toFixed(1), r: 1.6, fill: colour }));
    }
  });
  const last = series.map((s) => s.values[s.values.length - 1]);
  svg.setAttribute("aria-label", `${title} for ${run.id.slice(0, 8)}: ` +
    series.map((s, i) => `${s.layer} ${last[i] === null || last[i] === undefined ? "n/a" : Number(last[i]).toPrecision(3)}`).join(", "));
  box.appendChild(svg);
  if (series.length > 1) {
    const legend = document.createElement("p");
    legend.className = "legend";
    legend.textContent = `${series[0].layer} (dark) … ${series[series.length - 1].layer} (light)`;
    box.appendChild(legend);
  }
  return box;
}

// The cause in bold with its phases; evidence, consequences and advice one click away.
function showDiagnosis(cell, d) {
  if (!d) return;
  const details = document.createElement("details");
  details.className = `diagnosis ${d.verdict}`;
  const summary = document.createElement("summary");
  const verdict = document.createElement("strong");
  verdict.textContent = d.verdict;
  summary.append(verdict, ` (${d.summary})`);
  details.appendChild(summary);
  const list = document.createElement("ul");
  const add = (label, text) => {
    const li = document.createElement("li");
    const b = document.createElement("b");
    b.textContent = `${label}: `;
    li.append(b, text);
    list.appendChild(li);
  };
  if (d.evidence) add("evidence", d.evidence);
  for (const c of d.consequences) add("consequence", c);
  if (d.advice) add("advice", d.advice);
  for (const p of d.phases) add(p.name, p.verdict + (p.evidence ? ` - ${p.evidence}` : ""));
  details.appendChild(list);
  cell.appendChild(details);
}

async function announce(job) {
  const end = Date.now() + 60000;
  while (Date.now() < end) {
    await loadModel();
    if (model && model.name === job.registered_model && model.version === job.registered_version) {
      show("banner", `A new champion is served: ${model.name} version ${model.version}, ` +
                     `trained by job ${job.id.slice(0, 8)}.`);
      return;
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function main() {
  setupPredict();
  await loadModel();
  try {
    schema = await api("/v1/train-schema");
    buildForm();
    if (schema.mlflow_ui) { $("mlflow-link").href = schema.mlflow_runs || schema.mlflow_ui; $("mlflow-link").hidden = false; }
  } catch (err) {
    show("train-error", `The training form could not be built: ${err.message}`);
  }
  $("token").value = sessionStorage.getItem("convserve-token") || "";
  $("train-form").addEventListener("submit", submitJob);
  // Jobs that ended before the page opened do not announce themselves.
  try {
    const page = await api("/jobs?page_size=20");
    for (const job of page.jobs) if (job.promoted) seenPromotions.add(job.id);
  } catch { /* shown by refreshJobs */ }
  for (const id of ["diag-a", "diag-b"]) {
    $(id).addEventListener("change", () => { $("diag-a").dataset.chosen = "1"; refreshDiagnosis(); });
  }
  await refreshJobs();
  setInterval(refreshJobs, 2000);
}

main();
