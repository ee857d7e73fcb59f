// convserve web page: predict with feature maps, start and watch training jobs, and chart a
// job's diagnostics live beside another job's.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;          // GET /v1/model?model=<picked>
let served = null;         // GET /v1/models
let picked = sessionStorage.getItem("convserve-model") || "";  // "" until the list is read
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
    const err = new Error(explain(response.status, body, text));
    err.status = response.status;
    err.retryAfter = Number(response.headers.get("Retry-After")) || 0;
    throw err;
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
const STATES = { READY: "ready", LOADING: "loading", UNLOADED: "loads on its next request",
                 UNAVAILABLE: "unavailable" };

async function loadModels() {
  try {
    served = await api("/v1/models");
  } catch (err) {
    $("models-note").textContent = `The models could not be listed: ${err.message}`;
    return;
  }
  const names = served.models.map((m) => m.name);
  if (!names.includes(picked)) picked = served.default;
  const select = $("model-pick");
  select.replaceChildren(...served.models.map((m) => {
    const what = [m.version ? `v${m.version}` : null, m.dataset ? datasetName(m.dataset) : null,
                  m.default ? "default" : null, m.state === "READY" ? null : STATES[m.state]];
    const option = new Option(`${m.name} (${what.filter(Boolean).join(", ")})`, m.name);
    option.disabled = m.state === "UNAVAILABLE" && !m.default;
    return option;
  }));
  select.value = picked;
  renderModels();
}

function datasetName(dataset) {  // an upload's "dataset:<name>@<id>" as its name
  return dataset.startsWith("dataset:") ? dataset.slice(8).split("@")[0] : dataset;
}

function renderModels() {
  const body = $("models").querySelector("tbody");
  body.replaceChildren();
  for (const m of served.models) {
    const tr = document.createElement("tr");
    if (m.name === picked) tr.className = "picked";
    const acc = m.metrics && (m.metrics.best_val_accuracy ?? m.metrics.val_accuracy);
    const cells = [m.name + (m.default ? " (default)" : ""), m.version ? `v${m.version}` : "",
                   m.dataset ? datasetName(m.dataset) : "", acc === undefined ? "" : acc.toFixed(3),
                   STATES[m.state] + (m.reason ? `: ${m.reason}` : ""),
                   m.memory_bytes ? `${(m.memory_bytes / 1048576).toFixed(1)} MiB` : "",
                   m.promotion || "", challengerText(m.rollout)];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  const budget = served.memory_budget_bytes;
  const used = `${(served.memory_in_use_bytes / 1048576).toFixed(1)} MiB in use per worker process`;
  const live = served.models.some((m) => m.rollout)
    ? " A challenger's live figures are the answering worker process's; each process logs its own to the challenger's MLflow run (live.*), which convserve promote reads."
    : "";
  $("models-note").textContent = (budget
    ? `${used} of ${(budget / 1048576).toFixed(0)} MiB (CONVSERVE_MODEL_MEMORY_MB): past it the least recently used model is unloaded.`
    : `${used}.`) + live;
}

// A challenger's shares and what it showed in the worker process that answered.
function challengerText(r) {
  if (!r) return "";
  const pct = (x) => `${(100 * x).toFixed(x < 0.1 ? 1 : 0)}%`;
  const shares = [r.shadow ? `shadow ${pct(r.shadow)}` : null, r.canary ? `canary ${pct(r.canary)}` : null]
    .filter(Boolean).join(", ") || "off";
  if (!r.version) return `${shares}: ${r.state}`;
  const live = r.live || {};
  const seen = live.shadowed
    ? `agreement ${(100 * live.agreement).toFixed(1)}% over ${live.shadowed} images, confidence ` +
      `${live.challenger_confidence.toFixed(2)} against ${live.champion_confidence.toFixed(2)}, ` +
      `${live.challenger_ms.toFixed(2)} ms against ${live.champion_ms.toFixed(2)} ms`
    : "nothing shadowed yet";
  const canary = live.canary ? `; ${live.canary} answers as canary` : "";
  const failed = live.failures ? `; ${live.failures} images failed on it` : "";
  const proc = r.shadow && r.shadow_process && r.shadow_process !== "RUNNING"
    ? `; ${r.shadow_process === "STARTING" ? "shadow process starting" : r.shadow_process.replace(/^FAILED: /, "")}`
    : "";
  const state = r.state === "READY" ? "" : ` (${STATES[r.state] || r.state}${r.reason ? `: ${r.reason}` : ""})`;
  return `v${r.version}, ${shares}${state}: ${seen}${canary}${failed}${proc}`;
}

function modelQuery() {
  return picked ? `&model=${encodeURIComponent(picked)}` : "";
}

async function pickModel() {
  picked = $("model-pick").value;
  sessionStorage.setItem("convserve-model", picked);
  renderModels();
  $("result").hidden = true;  // another model's answer: not this one's
  $("seen-box").hidden = true;
  placeZoom(null);
  $("maps").replaceChildren();
  await loadModel();
}

async function loadModel() {
  try {
    model = await retried(() => api(`/v1/model?${modelQuery().slice(1)}`));
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

// A model that is loading answers 503 with Retry-After: asked again then, for up to 30 s.
async function retried(call) {
  const end = Date.now() + 30000;
  for (;;) {
    try {
      return await call();
    } catch (err) {
      if (err.status !== 503 || !err.retryAfter || Date.now() > end) throw err;
      $("model-line").textContent = `${err.message.replace(/^503: /, "")}…`;
      await new Promise((r) => setTimeout(r, 1000 * err.retryAfter));
    }
  }
}

// ---- predict ---------------------------------------------------------------
let lastPrediction = null;
let selectedTile = null;

async function predict(blob, name) {
  show("predict-error", "");
  const form = () => { const f = new FormData(); f.append("file", blob, name); return f; };
  const explain = $("explain").checked ? "&explain=occlusion" : "";
  try {
    const which = modelQuery();
    const [pngs, stats] = await retried(() => Promise.all([
      api(`/predict?top_k=5&feature_maps=all&format=png&return_input=true${explain}${which}`,
          { method: "POST", body: form() }),
      api(`/predict?top_k=1&feature_maps=all&format=stats${which}`, { method: "POST", body: form() }),
    ]));
    lastStats = stats.predictions[0].feature_maps || {};
    lastPrediction = pngs.predictions[0];
    render(lastPrediction);
  } catch (err) {
    $("result").hidden = true;
    $("seen-box").hidden = true;
    show("predict-error", `Prediction failed: ${err.message}`);
  }
}

// Colour maps as a few stops, interpolated: grey, viridis, magma.
const COLORMAPS = {
  gray: [[0, 0, 0], [255, 255, 255]],
  viridis: [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
  magma: [[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]],
};
function colour(v, stops) {
  const x = (v / 255) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const t = x - i;
  return stops[i].map((c, k) => Math.round(c + t * (stops[i + 1][k] - c)));
}

function render(prediction) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const c of prediction.top_k) {
    const li = document.createElement("li");
    const pct = (100 * c.probability).toFixed(1);
    li.innerHTML = `<span class="label"></span><span class="track"><span class="bar"></span></span><span class="pct"></span>`;
    li.querySelector(".label").textContent = c.label;
    li.querySelector(".bar").style.width = `${Math.max(0.5, pct)}%`;
    li.querySelector(".pct").textContent = `${pct}%`;
    li.setAttribute("aria-label", `${c.label}: ${pct} percent`);
    bars.appendChild(li);
  }
  drawSeen(prediction);
  placeZoom(null);  // out of the tiles about to be replaced
  const maps = $("maps");
  maps.replaceChildren();
  for (const [block, fmap] of Object.entries(prediction.feature_maps || {})) {
    maps.appendChild(renderBlock(block, fmap));
  }
  selectedTile = null;
  $("zoom-text").textContent = "Select a tile";
  $("zoom-canvas").getContext("2d").clearRect(0, 0, 192, 192);
  $("seen-box").hidden = false;
  $("result").hidden = false;
}

// The input as the model saw it, with the occlusion map over it: red where hiding the region
// lowers the top class's probability, blue where hiding it raises it.
function drawSeen(prediction) {
  const canvas = $("seen");
  const ctx = canvas.getContext("2d");
  const input = prediction.input;
  const ex = prediction.explanation;
  const img = new Image();
  img.onload = () => {
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    $("seen-scale").hidden = !ex;
    if (ex) {
      const h = ex.heatmap.length, w = ex.heatmap[0].length;
      const scale = Math.max(Math.abs(ex.max_drop), ...ex.heatmap.flat().map(Math.abs), 1e-9);
      const points = (100 * scale).toFixed(1);
      $("scale-low").textContent = `-${points}`;
      $("scale-high").textContent = `+${points}`;
      $("scale-caption").textContent = `drop in P(${ex.label}) when a region is hidden, in points`;
      const cw = canvas.width / w, ch = canvas.height / h;
      for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) {
          const v = ex.heatmap[y][x] / scale;
          if (Math.abs(v) < 0.05) continue;
          ctx.fillStyle = v > 0 ? `rgba(255, 60, 40, ${0.65 * v})` : `rgba(60, 130, 255, ${-0.65 * v})`;
          ctx.fillRect(x * cw, y * ch, Math.ceil(cw), Math.ceil(ch));
        }
      }
    }
  };
  img.src = `data:image/png;base64,${input.png}`;
  const size = prediction.explanation ? ` Red: hiding the region lowers P(${ex.label}) (by up to ` +
    `${(100 * ex.max_drop).toFixed(1)} points); blue: hiding it raises it.` : "";
  const steps = input.steps.length ? `: ${input.steps.join(", ")}` : " (nothing to change)";
  $("seen-text").textContent = `${input.original} upload, ${input.fit} fit${steps}.${size}`;
  canvas.setAttribute("aria-label", ex
    ? `The model's input with its occlusion map for class ${ex.label}`
    : "The model's input");
}

function renderBlock(block, fmap) {
  const wrap = document.createElement("div");
  wrap.className = "block";
  const g = fmap.grid;
  const title = document.createElement("h4");
  title.textContent = `${block}: ${g.channels} channels of ${g.tile_height}x${g.tile_width}`;
  const grid = document.createElement("div");
  grid.className = "grid";
  const img = new Image();
  img.onload = () => {
    const stops = COLORMAPS[$("colormap").value] || COLORMAPS.gray;
    for (let c = 0; c < g.channels; c++) {
      const tile = document.createElement("button");
      tile.type = "button";
      tile.className = "tile";
      tile.setAttribute("aria-label", `${block} channel ${c}`);
      tile.setAttribute("aria-pressed", "false");
      const canvas = document.createElement("canvas");
      canvas.width = g.tile_width;
      canvas.height = g.tile_height;
      const x = (c % g.cols) * g.tile_width;
      const y = Math.floor(c / g.cols) * g.tile_height;
      const ctx = canvas.getContext("2d");
      ctx.drawImage(img, x, y, g.tile_width, g.tile_height, 0, 0, g.tile_width, g.tile_height);
      const data = ctx.getImageData(0, 0, g.tile_width, g.tile_height);
      for (let i = 0; i < data.data.length; i += 4) {
        const [r, gg, b] = colour(data.data[i], stops);
        data.data[i] = r; data.data[i + 1] = gg; data.data[i + 2] = b;
      }
      ctx.putImageData(data, 0, 0);
      tile.appendChild(canvas);
      const zoom = () => showZoom(block, c, canvas, tile);
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

// On a narrow screen the enlarged tile opens under the row of the tile tapped, across the
// grid, as galleries do; on a wide one it stays beside the grid.
const NARROW = window.matchMedia("(max-width: 900px)");
function placeZoom(tile) {
  const zoom = $("zoom");
  if (!NARROW.matches || !tile) {
    if (zoom.parentElement !== $("maps-layout")) $("maps-layout").appendChild(zoom);
    return;
  }
  const grid = tile.parentElement;
  const tiles = [...grid.querySelectorAll(".tile")];
  const columns = getComputedStyle(grid).gridTemplateColumns.split(" ").length;
  const rowEnd = (Math.floor(tiles.indexOf(tile) / columns) + 1) * columns - 1;
  const last = tiles[Math.min(tiles.length - 1, rowEnd)];
  if (last.nextElementSibling !== zoom) last.after(zoom);
}
NARROW.addEventListener("change", () => placeZoom(selectedTile));

function showZoom(block, channel, source, tile) {
  if (selectedTile) selectedTile.setAttribute("aria-pressed", "false");
  selectedTile = tile;
  tile.setAttribute("aria-pressed", "true");
  placeZoom(tile);
  const canvas = $("zoom-canvas");
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(source, 0, 0, canvas.width, canvas.height);
  const s = lastStats[block];
  const stats = s ? `mean ${s.mean[channel].toFixed(4)}, max ${s.max[channel].toFixed(4)}` : "";
  $("zoom-text").textContent = `${block}, channel ${channel}: ${stats}`;
  canvas.setAttribute("aria-label", `${block} channel ${channel}, enlarged`);
}

function setupPredict() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    const f = e.target.files[0];
    if (f) predict(f, f.name);
    e.target.value = "";  // choosing the same file again predicts again
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) predict(f, f.name);
  });
  $("colormap").addEventListener("change", () => { if (lastPrediction) render(lastPrediction); });
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
// Fields of the form, from the schema (titles and descriptions), each shown only when the
// chosen activation, init and optimizer use it: [section, field, kind, when].
const FIELDS = [
  ["data", "name"],
  ["data", "limit"],
  ["data", "balance"],
  ["model", "activation"],
  ["model", "negative_slope", "number", (c) => c.model.activation === "leaky_relu"],
  ["model", "hidden", "list"],
  ["init", "name"],
  ["init", "value", "number", (c) => c.init.name === "constant"],
  ["init", "mean", "number", (c) => c.init.name === "normal"],
  ["init", "std", "number", (c) => c.init.name === "normal"],
  ["init", "a", "number", (c) => c.init.name === "uniform"],
  ["init", "b", "number", (c) => c.init.name === "uniform"],
  ["init", "mode", "enum", (c) => c.init.name.startsWith("he_")],
  ["init", "gain", "number", (c) => /^(xavier|he)_|orthogonal/.test(c.init.name)],
  ["init", "scale", "number", (c) => !["default", "zeros", "lsuv"].includes(c.init.name)],
  ["optim", "optimizer"],
  ["optim", "lr"],
  ["optim", "momentum", "number", (c) => c.optim.optimizer === "sgd"],
  ["optim", "epochs"],
];
let currentPreset = null;

function resolve(ref) {
  return schema.schema.$defs[ref.split("/").pop()];
}

function fieldSchema(section, name) {
  const sec = resolve(schema.schema.properties[section].$ref || schema.schema.properties[section].allOf[0].$ref);
  let prop = sec.properties[name];
  if (prop.anyOf) prop = { ...prop, ...prop.anyOf.find((p) => p.type !== "null") };
  return prop;
}

function field(id, title, help, input) {
  const label = document.createElement("label");
  label.className = "field";
  label.id = `row-${id}`;
  const text = document.createElement("span");
  text.className = "label-text";
  text.textContent = title;
  input.id = id;
  label.append(text, input);
  if (help) {
    const h = document.createElement("span");
    h.className = "help";
    h.textContent = help;
    label.appendChild(h);
  }
  return label;
}

function buildForm() {
  const fields = $("fields");
  const block = resolve("#/$defs/BlockConfig").properties;
  const channels = document.createElement("input");
  channels.type = "text";
  channels.inputMode = "numeric";
  fields.appendChild(field("f-blocks", "Convolution blocks",
    "Filters per block, comma separated: each block is a 3x3 convolution, the activation, then pooling", channels));
  const pool = document.createElement("select");
  for (const p of block.pool.enum || resolve(block.pool.$ref || "#/$defs/PoolName").enum) pool.appendChild(new Option(p, p));
  fields.appendChild(field("f-pool", block.pool.title || "Pooling", block.pool.description, pool));
  for (const [section, name, kind] of FIELDS) {
    const prop = fieldSchema(section, name);
    let input;
    if (prop.enum) {
      input = document.createElement("select");
      // data sets: only those a job can train on from here, the built-in sets that need no
      // files on the worker; uploads are listed by name below them
      const values = section === "data" && name === "name" ? schema.builtin_datasets : prop.enum;
      for (const v of values) input.appendChild(new Option(v, v));
    } else {
      input = document.createElement("input");
      input.type = kind === "list" ? "text" : (prop.type === "integer" || prop.type === "number") ? "number" : "text";
      if (prop.type === "number") input.step = "any";
      if (prop.minimum !== undefined) input.min = prop.minimum;
    }
    input.addEventListener("change", updateVisibility);
    fields.appendChild(field(`f-${section}-${name}`, prop.title || `${section}.${name}`, prop.description, input));
  }
  const presets = $("presets");
  for (const name of Object.keys(schema.presets)) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = name;
    b.dataset.preset = name;
    b.setAttribute("aria-pressed", "false");
    b.addEventListener("click", () => choosePreset(name));
    presets.appendChild(b);
  }
  choosePreset(Object.keys(schema.presets)[0]);
}

// The data set picker: the built-in sets, then the uploaded ones (value "dataset:<id>").
let uploaded = [];
async function loadDatasets() {
  try {
    uploaded = (await api("/datasets")).datasets;
  } catch { uploaded = []; }
  const select = $("f-data-name");
  const current = select.value;
  select.querySelector("optgroup")?.remove();
  if (uploaded.length) {
    const group = document.createElement("optgroup");
    group.label = "Uploaded";
    for (const d of uploaded) {
      group.appendChild(new Option(`${d.name} (${d.images} images, ${Object.keys(d.classes).length} classes)`, `dataset:${d.id}`));
    }
    select.appendChild(group);
  }
  if ([...select.options].some((o) => o.value === current)) select.value = current;
}

function reportTable(r) {
  const wrap = document.createElement("div");
  const title = document.createElement("p");
  title.innerHTML = "<strong></strong> <span class='hint'></span>";
  title.querySelector("strong").textContent = `${r.name}: ${r.images} images in ${Object.keys(r.classes).length} classes`;
  title.querySelector(".hint").textContent = `id ${r.id}${r.created === false ? ", already stored" : ""}`;
  const table = document.createElement("table");
  table.innerHTML = "<thead><tr><th scope='col'>Class</th><th scope='col'>Images</th><th scope='col'>Problems</th></tr></thead><tbody></tbody>";
  const body = table.querySelector("tbody");
  const problems = {};
  const note = (path, text) => {
    const cls = path.split("/")[0];
    (problems[cls] = problems[cls] || []).push(text);
  };
  for (const s of r.skipped) note(s.path, `${s.path.split("/").slice(1).join("/")}: ${s.reason}`);
  for (const group of r.duplicates) note(group[0], `duplicates kept once: ${group.join(" = ")}`);
  for (const [cls, count] of Object.entries(r.classes)) {
    const tr = document.createElement("tr");
    tr.innerHTML = "<td></td><td></td><td></td>";
    tr.children[0].textContent = cls;
    tr.children[1].textContent = count;
    const list = [...(r.too_small.includes(cls) ? ["too few images to split"] : []), ...(problems[cls] || [])];
    tr.children[2].textContent = list.join("; ");
    body.appendChild(tr);
  }
  wrap.append(title, table);
  return wrap;
}

async function uploadDataset() {
  show("ds-error", "");
  const file = $("ds-file").files[0];
  const name = $("ds-name").value.trim();
  if (!file || !name) { show("ds-error", "Choose an archive and give it a name."); return; }
  sessionStorage.setItem("convserve-token", token());
  $("ds-upload").disabled = true;
  try {
    const report = await api(`/datasets?name=${encodeURIComponent(name)}`, {
      method: "POST", body: file,
      headers: { "Content-Type": "application/octet-stream", Authorization: `Bearer ${token()}` },
    });
    $("ds-report").replaceChildren(reportTable(report));
    await loadDatasets();
    $("f-data-name").value = `dataset:${report.id}`;
  } catch (err) {
    show("ds-error", `The upload was refused: ${err.message}`);
  } finally {
    $("ds-upload").disabled = false;
  }
}

function choosePreset(name) {
  currentPreset = name;
  for (const b of $("presets").children) b.setAttribute("aria-pressed", String(b.dataset.preset === name));
  fill(schema.presets[name]);
}

function fill(cfg) {
  const a = cfg.data.augment || {};
  $("aug-crop").checked = Boolean(a.crop_scale);
  $("aug-flip").checked = (a.hflip || 0) > 0;
  $("aug-rotation").value = a.rotation || 0;
  $("aug-jitter").value = a.color_jitter || 0;
  $("f-blocks").value = cfg.model.blocks.map((b) => b.out_channels).join(",");
  $("f-pool").value = cfg.model.blocks.length ? cfg.model.blocks[0].pool : "max";
  for (const [section, name, kind] of FIELDS) {
    const v = cfg[section][name];
    $(`f-${section}-${name}`).value = kind === "list" ? v.join(",") : (v ?? "");
  }
  updateVisibility();
}

// Only the fields the chosen activation, init and optimizer read are shown.
function updateVisibility() {
  const now = { model: { activation: $("f-model-activation").value }, init: { name: $("f-init-name").value },
                optim: { optimizer: $("f-optim-optimizer").value } };
  for (const [section, name, , when] of FIELDS) {
    $(`row-f-${section}-${name}`).hidden = when ? !when(now) : false;
  }
}

function readForm() {
  const cfg = JSON.parse(JSON.stringify(schema.presets[currentPreset]));
  const numbers = (text) => text.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const pool = $("f-pool").value;
  cfg.model.blocks = numbers($("f-blocks").value).map((c, i) => ({
    ...(cfg.model.blocks[i] || {}), out_channels: c, pool }));
  for (const [section, name, kind] of FIELDS) {
    if ($(`row-f-${section}-${name}`).hidden) continue;  // unused: the preset's value stands
    const raw = $(`f-${section}-${name}`).value;
    const prop = fieldSchema(section, name);
    if (kind === "list") cfg[section][name] = numbers(raw);
    else if (raw === "") cfg[section][name] = null;
    else cfg[section][name] = (prop.type === "integer" || prop.type === "number") ? Number(raw) : raw;
  }
  if (cfg.data.name.startsWith("dataset:")) {
    cfg.data.id = cfg.data.name.slice("dataset:".length);
    cfg.data.name = "dataset";
  }
  cfg.data.augment = {
    ...($("aug-crop").checked ? { crop_scale: [0.8, 1.0] } : {}),
    ...($("aug-flip").checked ? { hflip: 0.5 } : {}),
    rotation: Number($("aug-rotation").value) || 0,
    color_jitter: Number($("aug-jitter").value) || 0,
  };
  delete cfg.tracking;
  return cfg;
}

function token() {
  return $("token").value.trim();
}

async function submitJob(e) {
  e.preventDefault();
  if (!schema) return;  // the form is not built yet
  show("train-error", "");
  sessionStorage.setItem("convserve-token", token());
  const cfg = readForm();
  const ownData = cfg.data.name === "dataset";
  try {
    await api("/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token()}` },
      // A job on an uploaded set registers into the model named for the set (the server's
      // choice); any other into the default model, when the server follows one.
      body: JSON.stringify({ train: cfg, promote: true, ...(ownData ? {} : defaultModel()) }),
    });
    await refreshJobs();
  } catch (err) {
    show("train-error", `The job was not started: ${err.message}`);
  }
}

function defaultModel() {
  const first = served && served.models.find((m) => m.default);
  return first && first.alias ? { model_name: first.name } : {};
}

function servedVersion(name) {
  const m = served && served.models.find((x) => x.name === name && x.state === "READY");
  return m ? m.version : null;
}

async function cancelJob(id) {
  try {
    await api(`/jobs/${id}`, { method: "DELETE", headers: { Authorization: `Bearer ${token()}` } });
    await refreshJobs();
  } catch (err) {
    show("train-error", `Cancelling failed: ${err.message}`);
  }
}

// ---- jobs ------------------------------------------------------------------
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
  $("no-jobs").hidden = page.jobs.length > 0;
  for (const job of page.jobs) {
    const tr = document.createElement("tr");
    tr.dataset.id = job.id;
    tr.dataset.status = job.status;
    const p = job.progress;
    const acc = job.metrics.val_accuracy;
    tr.innerHTML = `<td class="id"></td><td class="status"></td><td></td><td></td><td class="model"></td><td></td><td class="actions"></td>`;
    const [idCell, statusCell, progressCell, accCell, modelCell, verdictCell, actions] = tr.children;
    // Labels for the stacked layout of narrow screens, where the header row is not shown.
    const labels = ["Job", "Status", "Progress", "Val acc", "Model", "Diagnosis", ""];
    [...tr.children].forEach((td, i) => { td.dataset.label = labels[i]; });
    const code = document.createElement("span");
    code.className = "mono";
    code.textContent = job.id.slice(0, 8);
    idCell.appendChild(code);
    // what it trains: the data set, then the run's name (activation, init, filters)
    const what = document.createElement("div");
    what.className = "hint job-what";
    what.textContent = [job.dataset && `on ${job.dataset}`, job.name].filter(Boolean).join(" · ");
    idCell.appendChild(what);
    if (job.links.mlflow) {
      const a = document.createElement("a");
      a.href = job.links.mlflow; a.textContent = "MLflow run"; a.target = "_blank";
      a.setAttribute("aria-label", `MLflow run of job ${job.id.slice(0, 8)}`);
      idCell.appendChild(a);
    }
    statusCell.textContent = job.status;
    if (p.total) {
      const bar = document.createElement("progress");
      bar.max = p.total; bar.value = p.step || 0;
      bar.setAttribute("aria-label", `step ${p.step || 0} of ${p.total}`);
      const words = document.createElement("div");
      words.className = "hint";
      // The epoch a job reports is the last one finished: none during the first.
      words.textContent = `step ${p.step || 0} of ${p.total}` + (p.epoch ? `, epoch ${p.epoch} done` : "");
      progressCell.append(bar, words);
    } else if (p.trials) {
      // A sweep: its trials, ended (finished, pruned or failed) out of planned.
      const t = p.trials;
      const ended = t.finished + t.pruned + t.failed;
      const bar = document.createElement("progress");
      bar.max = Math.max(t.trials, ended); bar.value = ended;
      bar.setAttribute("aria-label", `${ended} of ${t.trials} trials ended`);
      const words = document.createElement("div");
      words.className = "hint";
      words.textContent = `${ended} of ${t.trials} trials: ${t.finished} finished` +
        (t.pruned ? `, ${t.pruned} pruned` : "") + (t.failed ? `, ${t.failed} failed` : "") +
        (t.running ? `, ${t.running} running` : "");
      progressCell.append(bar, words);
    }
    accCell.textContent = acc === undefined ? "" : acc.toFixed(3);
    if (job.registered_version) {
      modelCell.textContent = `v${job.registered_version} `;
      // The champion is the version being served now; an earlier champion says "promoted".
      const serving = servedVersion(job.registered_model) === job.registered_version;
      if (serving || job.promoted) {
        const badge = document.createElement("span");
        badge.className = serving ? "badge ok" : "badge";
        badge.textContent = serving ? "champion" : "promoted";
        modelCell.appendChild(badge);
      }
      const registered = document.createElement("div");  // which registered model
      registered.className = "hint job-what";
      registered.textContent = job.registered_model;
      modelCell.appendChild(registered);
    }
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
      $("diag-a").dataset.chosen = "1";
      refreshDiagnosis();
      $("diagnose").scrollIntoView({ behavior: "smooth" });
    });
    actions.appendChild(watch);
    body.appendChild(tr);
    if (job.error) {
      // the error on a row of its own, across the table: a long one wraps at its width
      const row = document.createElement("tr");
      row.className = "error-row";
      row.dataset.errorFor = job.id;
      const cell = document.createElement("td");
      cell.colSpan = tr.children.length;
      cell.className = "job-error";
      cell.textContent = job.error;
      cell.dataset.label = "Error";
      row.appendChild(cell);
      tr.classList.add("has-error");
      body.appendChild(row);
    }
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
// Statistics that mean something for some activations only: a ReLU-family unit is dead when
// it outputs zero for the whole batch; sigmoid and tanh saturate at their asymptotes.
const APPLIES = {
  dead: ["relu", "leaky_relu", "elu", "gelu"],
  saturated: ["sigmoid", "tanh"],
};
function applies(key, run) {
  return !(key in APPLIES) || !run.activation || APPLIES[key].includes(run.activation);
}
let diagTimer = null;
let diagBusy = false;
let diagAgain = false;  // a choice made while a refresh was on its way: read it next

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
  if (diagBusy) {
    diagAgain = true;
    return;
  }
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
    if (diagAgain) {
      diagAgain = false;
      refreshDiagnosis();
    }
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
    runs.some((r) => applies(key, r) && seriesOf(r, key).some((s) => s.values.length)));
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
    runs.forEach((run, i) => row.appendChild(applies(key, run)
      ? chart(title, all[i], range, log, lastStep, run)
      : notApplicable(key, run)));
    cell.append(caption, row);
    charts.appendChild(cell);
  }
}

function tick(v) {
  const a = Math.abs(v);
  return a !== 0 && (a < 0.01 || a >= 1000) ? v.toExponential(0) : String(Number(v.toPrecision(2)));
}

function notApplicable(key, run) {
  const box = document.createElement("p");
  box.className = "not-applicable";
  box.textContent = `${run.id.slice(0, 8)}: not measured for ${run.activation} ` +
    `(${key === "dead" ? "only ReLU-family units output exactly zero" : "only sigmoid and tanh have asymptotes"})`;
  return box;
}

// Round values for an axis from lo to hi: decades on a log scale (every other one when
// there are many), else 1, 2 or 5 times a power of ten, about five of them.
function ticks(lo, hi, log) {
  if (log) {
    const a = Math.floor(Math.log10(lo)), b = Math.ceil(Math.log10(hi));
    const inside = (v) => v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9);
    const fine = [];  // 1, 2 and 5 times each power of ten: for ranges of a decade or two
    for (let e = a; e <= b; e++) for (const m of [1, 2, 5]) if (inside(m * 10 ** e)) fine.push(m * 10 ** e);
    if (fine.length >= 3 && fine.length <= 7) return fine;
    const every = Math.max(1, Math.ceil((b - a + 1) / 6));
    const out = [];
    for (let e = a; e <= b; e += every) if (inside(10 ** e)) out.push(10 ** e);
    return out.length >= 2 ? out : [lo, hi];
  }
  const raw = (hi - lo) / 4;
  const power = 10 ** Math.floor(Math.log10(raw || 1));
  const step = [1, 2, 5, 10].map((m) => m * power).find((m) => m >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(6)));
  return out;
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
  if (d) card.appendChild(diagnosisList(d, false));
  return card;
}

const SVG = "http://www.w3.org/2000/svg";
function el(name, attrs) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

// One chart: a line per layer over steps, dark (input side) to light (output side), with
// ticks and grid lines on both axes.
function chart(title, series, [lo, hi], log, lastStep, run) {
  const box = document.createElement("div");
  const W = 480, H = 220, L = 48, R = 10, T = 8, B = 34;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const x0 = 0, x1 = lastStep;
  const f = log ? Math.log10 : (v) => v;
  const x = (s) => L + ((s - x0) / (x1 - x0 || 1)) * (W - L - R);
  const y = (v) => T + (1 - (f(v) - f(lo)) / (f(hi) - f(lo) || 1)) * (H - T - B);
  svg.appendChild(el("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "plot" }));
  for (const v of ticks(lo, hi, log)) {
    svg.appendChild(el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    const t = el("text", { x: L - 4, y: y(v) + 3.5, "text-anchor": "end", class: "tick" });
    t.textContent = tick(v);
    svg.appendChild(t);
  }
  for (const st of ticks(x0, x1, false)) {
    svg.appendChild(el("line", { x1: x(st), x2: x(st), y1: T, y2: H - B, class: "grid" }));
    const t = el("text", { x: x(st), y: H - B + 13, "text-anchor": "middle", class: "tick" });
    t.textContent = String(st);
    svg.appendChild(t);
  }
  const t = el("text", { x: W - R, y: H - 4, "text-anchor": "end", class: "tick" });
  t.textContent = `step (${run.id.slice(0, 8)}, ${run.activation || "?"})`;
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
  details.append(summary, diagnosisList(d, true));
  cell.appendChild(details);
}

// Evidence, consequences and advice as a list (and each phase, when asked).
function diagnosisList(d, phases) {
  const list = document.createElement("ul");
  const knob = d.knob ? [["knob", `${d.knob}: ${d.attribution}`]] : [];
  const rows = [["evidence", d.evidence], ...d.consequences.map((c) => ["consequence", c]), ...knob, ["advice", d.advice]];
  if (phases) rows.push(...d.phases.map((p) => [p.name, p.verdict + (p.evidence ? ` - ${p.evidence}` : "")]));
  for (const [label, text] of rows) {
    if (!text) continue;
    const li = document.createElement("li");
    const b = document.createElement("b");
    b.textContent = `${label}: `;
    li.append(b, text);
    list.appendChild(li);
  }
  return list;
}

async function announce(job) {
  const end = Date.now() + 60000;
  while (Date.now() < end) {
    await loadModels();
    if (servedVersion(job.registered_model) === job.registered_version) {
      show("banner", `A new champion is served: ${job.registered_model} version ` +
                     `${job.registered_version}, trained by job ${job.id.slice(0, 8)}. ` +
                     "Pick it above to try it.");
      if (job.registered_model === picked) await loadModel();
      return;
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function main() {
  setupPredict();
  // Before anything is awaited: a click while the form is being built never submits the
  // bare HTML form (its button is disabled until then).
  $("train-form").addEventListener("submit", submitJob);
  $("token").value = sessionStorage.getItem("convserve-token") || "";
  $("model-pick").addEventListener("change", pickModel);
  await loadModels();
  await loadModel();
  try {
    schema = await api("/v1/train-schema");
    buildForm();
    $("train-submit").disabled = false;
    if (schema.mlflow_ui) { $("mlflow-link").href = schema.mlflow_runs || schema.mlflow_ui; $("mlflow-link").hidden = false; }
  } catch (err) {
    show("train-error", `The training form could not be built: ${err.message}`);
  }
  $("ds-upload").addEventListener("click", uploadDataset);
  if (schema) await loadDatasets();
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
  setInterval(loadModels, 5000);
}

main();
