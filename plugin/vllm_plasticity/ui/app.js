// The plasticity page: concept scores on the text, steering sliders, a panel that teaches a fact.
// Plain browser JavaScript, no build step, no third-party code; talks only to the server's public routes
// (README "HTTP API"), with the API key the user typed (kept in localStorage, sent as a Bearer token).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "plasticity-api-key";
const PALETTE = ["#0a58ca", "#b3261e", "#1e7b34", "#8a4baf", "#c66a00", "#00838f"];
const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  model: null, info: null,
  banks: [],          // GET /readout: the loaded banks
  bank: null,         // the bank the page reads and steers with
  tokens: [],         // [{id, text, prompt}] for the last generation, in position order
  scores: new Map(),  // position -> scores[layer index][concept index] for the last generation
  readLayers: [], readConcepts: [],  // the layers and concepts the scores are for
  readCalibrated: false,  // the scores are calibrated (0 = as the corpus on average, 1 = as the concept's texts)
};

class ApiError extends Error {
  constructor(status, reason) { super(`${status}: ${reason}`); this.status = status; this.reason = reason; }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function reasonOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail))
      : body.error?.message || text;
  } catch { return text; }
}

async function api(path, body = null, method = null) {
  const response = await fetch(path, { method: method || (body ? "POST" : "GET"), headers: headers(),
                                       body: body ? JSON.stringify(body) : null });
  if (!response.ok) throw new ApiError(response.status, await reasonOf(response));
  return response.json();
}

function setStatus(text, error = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", error);
}

function reportError(err) {
  const hint = err.status === 401 ? " (enter the server's API key above)" : "";
  setStatus((err.reason || err.message) + hint, true);
}

// ---- server, banks --------------------------------------------------------------------------------

async function refresh() {
  try {
    state.info = await api("/plasticity/info");
    state.model = (await api("/v1/models")).data[0].id;
    $("model-name").textContent = `${state.info.architecture} · ${state.model}`;
    $("train-panel").hidden = !state.info.features.training;
    if (state.info.features.training) await chooseTrainDefaults();
    await refreshBanks();
    setStatus("ready");
  } catch (err) { reportError(err); }
}

async function refreshBanks(select = null) {
  const listing = await api("/readout");
  state.banks = listing.banks;
  const bankSelect = $("bank-select");
  bankSelect.replaceChildren(...state.banks.map((b) => new Option(`${b.name} (${b.concepts.length} concepts)`, b.name)));
  if (select) bankSelect.value = select;
  const available = await api("/readout/available");
  const loadedSources = new Set(state.banks.map((b) => b.source));
  $("available-select").replaceChildren(...available.banks.map((b) => new Option(
    `${b.path} (${b.concepts} concepts${loadedSources.has(`${available.vectors_dir}/${b.path}`) ? ", loaded" : ""})`, b.path)));
  chooseBank(bankSelect.value);
}

function chooseBank(name) {
  state.bank = state.banks.find((b) => b.name === name) || null;
  const concepts = state.bank ? state.bank.concepts : [];
  const layers = state.bank ? state.bank.layers : [];
  $("concept-select").replaceChildren(...concepts.map((c, i) => new Option(c, i)));
  $("layer-select").replaceChildren(...layers.map((L, i) => new Option(`layer ${L}`, i)));
  $("chart-concepts").replaceChildren(...concepts.map((c, i) => {
    const o = new Option(c, i); o.selected = i < 3; return o; }));
  buildSliders(concepts, Boolean(state.bank && state.bank.calibrated));
  render();
}

async function loadBank() {
  const path = $("available-select").value;
  if (!path) return setStatus("no bank directory in the vectors directory", true);
  const name = path.replace(/[^A-Za-z0-9_.-]/g, "-").replace(/^[^A-Za-z0-9]+/, "").slice(0, 64) || "bank";
  try {
    setStatus(`loading ${path} ...`);
    await api("/readout/load", { name, path });
    await refreshBanks(name);
    setStatus(`loaded ${name}`);
  } catch (err) { reportError(err); }
}

// ---- read: stream a completion with its scores ---------------------------------------------------

async function tokenText(id) {
  const out = await api("/detokenize", { model: state.model, tokens: [id] });
  return out.prompt;
}

async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (event.startsWith("data: {")) yield JSON.parse(event.slice(6));
    }
  }
}

async function generate() {
  const button = $("generate");
  button.disabled = true;
  state.tokens = []; state.scores = new Map();
  render();
  const body = { model: state.model, prompt: $("prompt").value, max_tokens: Number($("max-tokens").value),
                 temperature: Number($("temperature").value), stream: true, logprobs: 0, prompt_logprobs: 0,
                 return_token_ids: true };
  if (state.bank) body.vllm_xargs = { readout: state.bank.name };
  try {
    setStatus("generating ...");
    const response = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) throw new ApiError(response.status, await reasonOf(response));
    for await (const event of serverEvents(response)) {
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.prompt_token_ids && state.tokens.length === 0) await addPromptTokens(choice);
      const ids = choice.token_ids || [];
      const texts = (choice.logprobs && choice.logprobs.tokens) || [];
      ids.forEach((id, i) => state.tokens.push({ id, text: texts[i] ?? "", prompt: false }));
      if (choice.readout) addScores(choice.readout);
      render();
    }
    setStatus(state.bank ? `scored ${state.scores.size} of ${state.tokens.length} tokens` :
              "generated (load a bank to see concept scores)");
  } catch (err) { reportError(err); }
  finally { button.disabled = false; }
}

async function addPromptTokens(choice) {
  const ids = choice.prompt_token_ids;
  const logprobs = choice.prompt_logprobs || [];
  const texts = await Promise.all(ids.map((id, i) => {
    const entry = logprobs[i] && logprobs[i][String(id)];
    return entry && entry.decoded_token != null ? entry.decoded_token : tokenText(id);
  }));
  ids.forEach((id, i) => state.tokens.push({ id, text: texts[i], prompt: true }));
}

function addScores(readout) {
  if (readout.error) setStatus(readout.error, true);
  state.readLayers = readout.layers; state.readConcepts = readout.concepts;
  state.readCalibrated = Boolean(readout.calibrated);
  readout.positions.forEach((p, i) => state.scores.set(p, readout.scores[i]));
}

function score(position, layerIndex, conceptIndex) {
  const s = state.scores.get(position);
  return s ? s[layerIndex][conceptIndex] : undefined;
}

function colour(value, scale) {
  const t = Math.max(-1, Math.min(1, scale > 0 ? value / scale : 0));
  const [r, g, b] = t < 0 ? [33, 102, 172] : [178, 24, 43];
  const mix = (c) => Math.round(255 + (c - 255) * Math.abs(t));
  return `rgb(${mix(r)}, ${mix(g)}, ${mix(b)})`;
}

function selection() {
  return { layer: Number($("layer-select").value || 0), concept: Number($("concept-select").value || 0) };
}

function render() {
  const { layer, concept } = selection();
  const values = [...state.scores.keys()].map((p) => score(p, layer, concept)).filter((v) => v !== undefined);
  const largest = values.length ? Math.max(...values.map(Math.abs)) : 0;
  // Calibrated scores are z-scores, the same for every concept: 2 standard deviations is full colour unless exceeded.
  const scale = state.readCalibrated ? Math.max(2, largest) : largest;
  $("legend-min").textContent = (-scale).toFixed(2);
  $("legend-max").textContent = "+" + scale.toFixed(2);
  $("legend-units").textContent = !values.length ? "" : state.readCalibrated
    ? "calibrated: 0 = as the corpus on average, 1 = one standard deviation of the corpus along the concept"
    : "raw: hidden state · unit vector (this bank has no calibration)";
  const spans = state.tokens.map((tok, position) => {
    const span = document.createElement("span");
    span.className = "tok" + (tok.prompt ? " prompt" : "");
    span.dataset.position = position;
    span.textContent = tok.text;
    const value = score(position, layer, concept);
    if (value === undefined) span.classList.add("unscored");
    else { span.style.backgroundColor = colour(value, scale); span.dataset.score = value; }
    return span;
  });
  $("tokens").replaceChildren(...spans);
  drawChart();
}

function showTooltip(event) {
  const span = event.target.closest(".tok");
  const tip = $("tooltip");
  if (!span) { tip.hidden = true; return; }
  const position = Number(span.dataset.position);
  const { layer } = selection();
  const s = state.scores.get(position);
  const head = `position ${position} · ${JSON.stringify(state.tokens[position].text)}`;
  if (!s) { tip.textContent = head + "\nnot scored (the last generated token is never fed to the model)"; }
  else {
    const top = state.readConcepts.map((c, i) => [c, s[layer][i]]).sort((a, b) => b[1] - a[1]).slice(0, 5);
    tip.textContent = head + `\nlayer ${state.readLayers[layer]}, top concepts:\n` +
      top.map(([c, v]) => `${c.padEnd(14)} ${v >= 0 ? "+" : ""}${v.toFixed(3)}`).join("\n");
  }
  tip.style.whiteSpace = "pre";
  tip.hidden = false;
  tip.style.left = event.clientX + 14 + "px";
  tip.style.top = event.clientY + 14 + "px";
}

// ---- charts (SVG, drawn here) -----------------------------------------------------------------------

function svgEl(name, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function lineChart(svg, series, width, height, xName) {
  const all = series.flatMap((s) => s.points.map((p) => p[1]));
  const n = Math.max(1, ...series.map((s) => s.points.length ? s.points[s.points.length - 1][0] : 0));
  const lo = Math.min(0, ...all), hi = Math.max(0, ...all);
  const pad = (hi - lo) * 0.05 || 1;
  const x = (i) => 10 + (i / n) * (width - 20);
  const y = (v) => height - 10 - ((v - (lo - pad)) / (hi - lo + 2 * pad)) * (height - 20);
  const label = (text, x0, y0, anchor) => {
    const t = svgEl("text", { x: x0, y: y0, "text-anchor": anchor, "font-size": 11, fill: "#6e6e73" });
    t.textContent = text; return t; };
  const parts = [svgEl("line", { x1: 10, x2: width - 10, y1: y(0), y2: y(0), stroke: "#d2d2d7" }),
                 label(hi.toFixed(2), 12, 14, "start"), label(lo.toFixed(2), 12, height - 4, "start"),
                 label(`${xName} ${n}`, width - 12, height - 4, "end")];
  for (const s of series) {
    if (!s.points.length) continue;
    parts.push(svgEl("polyline", { fill: "none", stroke: s.colour, "stroke-width": 2,
                                   points: s.points.map(([i, v]) => `${x(i)},${y(v)}`).join(" ") }));
  }
  svg.replaceChildren(...parts);
}

function drawChart() {
  const { layer } = selection();
  const chosen = [...$("chart-concepts").selectedOptions].map((o) => Number(o.value)).slice(0, PALETTE.length);
  const positions = [...state.scores.keys()].sort((a, b) => a - b);
  const series = chosen.map((c, k) => ({ colour: PALETTE[k], name: state.bank ? state.bank.concepts[c] : "",
    points: positions.map((p) => [p, score(p, layer, c)]).filter((pt) => pt[1] !== undefined) }));
  lineChart($("chart"), series, 720, 220, "position");
  $("chart-legend").replaceChildren(...series.map((s) => {
    const el = document.createElement("span"); el.style.color = s.colour; el.textContent = "■ " + s.name; return el; }));
}

// ---- steer ----------------------------------------------------------------------------------------

// The units the sliders count. A calibrated bank steers in the server's natural units: with steer rows
// (calibration.steer, banks extracted since) 1 moves the stream by the concept's own texts' mean offset from
// the corpus average; without them (older banks) 1 adds one standard deviation of the corpus along the
// concept. Raw (the norm added to the stream) for a bank without calibration.
const SLIDER_UNITS = {
  // SmolLM2-135M changed tone at 4 offsets at one layer and broke at 8 (research/results/steering_real.md);
  // steered at four layers at once it changed at 1 and broke at 4 (steering_real_multilayer.md): the layers'
  // pushes add up, so this range is for one layer and the sliders divide it by the layers steered.
  offset: { min: -8, max: 8, step: 0.1, perLayer: true,
            text: "strength in natural units: 1 moves the stream at each steered layer by the concept's own texts' " +
                  "average offset from the corpus average" },
  // ... and from ~32 standard deviations along the lda vectors of older banks (steering_real_lda_std.md).
  natural: { min: -40, max: 40, step: 0.5,
             text: "strength in natural units: 1 adds one standard deviation of the corpus along the concept at each steered layer " +
                   "(it raises that layer's calibrated score by 1)" },
  raw: { min: -40, max: 40, step: 0.5,
         text: "raw coefficient: the norm added to the residual stream (this bank has no calibration)" },
};

function sliderUnits(bank) {
  if (!bank || !bank.calibrated) return SLIDER_UNITS.raw;
  return bank.calibration && bank.calibration.steer ? SLIDER_UNITS.offset : SLIDER_UNITS.natural;
}

// What the extractor measured steering to be good for on this model (calibration.steering_range per layer,
// training/plasticity_training/steering_range.py), as one line: "layer 15: 32", "layer 3: 16 to 32".
function recommendedStrengths(bank) {
  const ranges = (bank && bank.calibration && bank.calibration.steering_range) || {};
  return Object.entries(ranges).filter(([, r]) => r.low !== null && r.high !== null && r.high >= r.low)
    .map(([layer, r]) => `layer ${layer}: ${r.low === r.high ? r.low : `${r.low} to ${r.high}`}`).join(", ");
}

// How many layers a steered request will steer: those typed in the Layers field, else all of the bank's.
function steeredLayerCount() {
  const typed = $("steer-layers").value.split(",").filter((s) => s.trim() !== "").length;
  return typed || (state.bank ? state.bank.layers.length : 1) || 1;
}

// The sliders' range and the units line, for the bank's units and the layers steered (see SLIDER_UNITS).
function sliderRange(units, recommended) {
  const layers = units.perLayer ? steeredLayerCount() : 1;
  const max = Number((units.max / layers).toPrecision(2));  // 8/3 -> 2.7, 8/30 -> 0.27
  const text = units.text + (layers > 1 ? `; ${layers} layers steered at once add up, so the sliders reach ` +
    `${max} (${units.max} at one layer)` : "") +
    (recommended ? `; recommended strength at one layer, measured on this model at extraction: ${recommended}` : "");
  // Steps of a round size, about 40 to 400 of them over the range: 0.1 at one layer, 0.01 at 3 to 30.
  return { min: -max, max, step: Math.min(units.step, 10 ** Math.floor(Math.log10(max / 40))), text };
}

function applySliderRange() {
  if (!state.bank) return;
  const units = state.bank.calibrated ? sliderUnits(state.bank) : SLIDER_UNITS.raw;
  const range = sliderRange(units, state.bank.calibrated ? recommendedStrengths(state.bank) : "");
  $("steer-units").textContent = state.bank.concepts.length ? range.text : "";
  for (const input of $("sliders").querySelectorAll("input[type=range]")) {
    Object.assign(input, { min: range.min, max: range.max, step: range.step });
    input.dispatchEvent(new Event("input"));  // the browser clamped the value: show it
  }
}

function buildSliders(concepts, calibrated) {
  const units = calibrated ? sliderUnits(state.bank) : SLIDER_UNITS.raw;
  const range = sliderRange(units, calibrated ? recommendedStrengths(state.bank) : "");
  $("steer-units").textContent = !concepts.length ? "" : range.text;
  $("sliders").replaceChildren(...concepts.map((c) => {
    const row = document.createElement("label");
    row.className = "slider"; row.dataset.concept = c;
    const name = document.createElement("span"); name.className = "name"; name.textContent = c; name.title = c;
    const input = Object.assign(document.createElement("input"),
      { type: "range", min: range.min, max: range.max, step: range.step, value: 0, name: c });
    const out = document.createElement("output"); out.textContent = "0";
    input.addEventListener("input", () => { out.textContent = input.value; });
    row.append(name, input, out);
    return row;
  }));
}

function steerTerms() {
  const terms = [];
  for (const input of $("sliders").querySelectorAll("input[type=range]")) {
    const coef = Number(input.value);
    if (coef !== 0) terms.push(`${state.bank.name}/${input.name}`, coef);
  }
  return terms;
}

async function completeText(prompt, maxTokens, xargs = null) {
  const body = { model: state.model, prompt, max_tokens: maxTokens, temperature: 0 };
  if (xargs) body.vllm_xargs = xargs;
  return (await api("/v1/completions", body)).choices[0].text;
}

async function steerGenerate() {
  if (!state.bank) return setStatus("load a bank first: steering uses its concept vectors", true);
  const terms = steerTerms();
  if (!terms.length) return setStatus("move a slider away from 0 to steer", true);
  const xargs = { steer: terms, steer_units: state.bank.calibrated ? "natural" : "raw" };
  const layers = $("steer-layers").value.trim();
  if (layers) xargs.steer_layers = layers.split(",").map((s) => Number(s.trim()));
  const prompt = $("prompt").value, n = Number($("max-tokens").value);
  try {
    setStatus("generating plain and steered ...");
    // One after the other, not together: each then runs alone, as the same request sent to the API would,
    // so the texts shown are exactly what the API answers (a shared batch can flip a near-tied greedy token).
    const plain = await completeText(prompt, n);
    const steered = await completeText(prompt, n, xargs);
    $("plain-out").textContent = plain;
    $("steered-out").textContent = steered;
    setStatus(`steered with ${terms.length / 2} concept(s)`);
  } catch (err) { reportError(err); }
}

// ---- teach ----------------------------------------------------------------------------------------

async function tokenize(text, special) {
  return (await api("/tokenize", { model: state.model, prompt: text, add_special_tokens: special })).tokens;
}

// The sample to teach, as the mode says: chat turns through the server's own conversion (POST
// /train/convert: the model's chat template, as `plasticity train` uses it), or raw text tokenized here.
async function trainSample() {
  if ($("train-mode-chat").checked) {
    const user = $("train-question").value, assistant = $("train-answer").value;
    if (!user.trim() || !assistant.trim()) throw new ApiError(400, "write both the user's message and the answer");
    const line = { messages: [{ role: "user", content: user }, { role: "assistant", content: assistant }] };
    return (await api("/train/convert", { lines: [line] })).samples[0];
  }
  const context_ids = await tokenize($("train-context").value, true);
  const continuation_ids = await tokenize($("train-continuation").value, false);
  if (!continuation_ids.length) throw new ApiError(400, "the continuation is empty");
  return { context_ids, continuation_ids };
}

async function teach() {
  const button = $("teach");
  button.disabled = true;
  try {
    const sample = await trainSample();
    const n = sample.continuation_ids.length;
    $("train-before").textContent = await completeText(sample.context_ids, n);
    setStatus(`training ${$("train-steps").value} steps ...`);
    const job = await api("/train", { samples: [sample], steps: Number($("train-steps").value), force: true,
                                      optimizer: { lr: Number($("train-lr").value) } });
    $("train-after").textContent = await completeText(sample.context_ids, n);
    const losses = job.losses || [];
    lineChart($("loss-chart"), [{ colour: PALETTE[0], points: losses.map((v, i) => [i, v]) }], 720, 160, "step");
    $("train-log").textContent = `${job.job_id}: ${job.status}, ${job.steps} steps on ${job.tokens} tokens, ` +
      `weight version ${job.weight_version}\nloss per step: ` + losses.map((v) => v.toFixed(4)).join(" ");
    setStatus(`taught in ${job.steps} steps`);
  } catch (err) { reportError(err); }
  finally { button.disabled = false; }
}

function showTrainMode() {
  const chat = $("train-mode-chat").checked;
  $("train-chat-fields").hidden = !chat;
  $("train-text-fields").hidden = chat;
}

// Chat mode where the served model has a chat template (its /tokenize renders messages), text otherwise.
// The learning rate starts where a fact is learned in the default steps without wrecking the model:
// measured, the built-in 1.3M model needs ~1e-2 for 25 steps; SmolLM2-135M learns one in <= 10 steps at
// 1e-4 (research/results/facts_real.md), where 1e-2 destroys what it knew.
async function chooseTrainDefaults() {
  let chat = true;
  try {
    await api("/tokenize", { model: state.model, messages: [{ role: "user", content: "hi" }], add_generation_prompt: true });
  } catch { chat = false; }
  (chat ? $("train-mode-chat") : $("train-mode-text")).checked = true;
  showTrainMode();
  const small = (state.info.num_parameters || 0) < 1e7;
  $("train-lr").value = small ? "0.01" : "0.0001";
  $("train-steps").value = small ? "20" : "10";
}

async function checkpoint() {
  try {
    setStatus("writing a checkpoint ...");
    const out = await api("/checkpoint", {});
    $("train-log").textContent += `\ncheckpoint: ${out.path} (${out.bytes_written} bytes, ` +
      `${out.blocks_changed}/${out.blocks_total} blocks, ${(out.seconds * 1000).toFixed(0)} ms)`;
    setStatus("checkpoint written");
  } catch (err) { reportError(err); }
}

// ---- wiring -----------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    localStorage.setItem(KEY_STORAGE, state.key);
    refresh();
  });
  $("bank-select").addEventListener("change", (e) => chooseBank(e.target.value));
  $("load-bank").addEventListener("click", loadBank);
  $("generate").addEventListener("click", generate);
  $("concept-select").addEventListener("change", render);
  $("layer-select").addEventListener("change", render);
  $("chart-concepts").addEventListener("change", drawChart);
  $("tokens").addEventListener("mousemove", showTooltip);
  $("tokens").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  $("steer-filter").addEventListener("input", (e) => {
    const q = e.target.value.toLowerCase();
    for (const row of $("sliders").children) row.hidden = !row.dataset.concept.toLowerCase().includes(q);
  });
  $("steer-reset").addEventListener("click", () => {
    for (const input of $("sliders").querySelectorAll("input")) { input.value = 0; input.dispatchEvent(new Event("input")); }
  });
  $("steer-generate").addEventListener("click", steerGenerate);
  $("steer-layers").addEventListener("input", applySliderRange);
  $("teach").addEventListener("click", teach);
  for (const radio of document.getElementsByName("train-mode")) radio.addEventListener("change", showTrainMode);
  $("checkpoint").addEventListener("click", checkpoint);
  refresh();
});
