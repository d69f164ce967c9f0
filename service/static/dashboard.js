// The bitplan dashboard: reads /v1 with the key kept in localStorage; writes nothing but
// re-solves (which change no stored state). Text from the API only ever goes into textContent.
"use strict";

const KEY_STORAGE = "bitplan.apiKey";
const ACTIVE_POLL_MS = 2000;   // while a job is queued or running, progress moves this often
const IDLE_POLL_MS = 15000;    // otherwise only new jobs can appear
const ACTIVE = new Set(["queued", "running"]);

const results = new Map();     // job id -> result JSON (a finished job's result never changes)
let timer = null;
let lastShown = null;          // the job list as last drawn
let listing = false;           // the message line speaks of listing jobs (cleared once they load)
let generation = 0;            // bumped by start/forget, so a refresh begun under an old key stops
let reportUrl = null;

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { ...(options.headers || {}), Authorization: `Bearer ${localStorage.getItem(KEY_STORAGE)}` },
  });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail || detail;
    } catch (_ignored) { /* not JSON */ }
    throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return response;
}

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "muted";
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function button(label, className, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  element.className = className;
  element.addEventListener("click", onClick);
  return element;
}

// How a result's metrics.eval_source is named: allocator/job_metrics.py's EVAL_SOURCES.
const EVAL_SOURCES = {
  eval: "your --eval file",
  holdout: "held-out part of the calibration data",
  calibration: "the calibration data (explicit)",
};

const SMALL_METRICS = new Set(["kl", "mse"]);  // printed to 3 significant digits, as job_metrics does

function signed(number, metric) {
  const text = SMALL_METRICS.has(metric) ? Number(number).toPrecision(3) : Number(number).toFixed(2);
  return `${number >= 0 ? "+" : ""}${text}`;
}

function verdictText(metrics) {
  const comparison = metrics.comparison;
  if (!comparison) return "";
  const primary = comparison.primary;
  const against = metrics.uniform ? `uniform W${metrics.uniform.bits}` : "uniform";
  const [value, low, high] = [primary.value, primary.low, primary.high].map((x) => signed(x, primary.metric));
  return ` · vs ${against}: ${comparison.verdict} (${primary.metric} ${value} [${low}, ${high}])`;
}

function summary(result) {
  const metrics = result.metrics;
  const primary = metrics.primary;
  const value = (entry) => (entry ? Number(entry[primary]).toFixed(2) : "n/a");
  const source = metrics.eval_source
    ? ` · evaluated on ${EVAL_SOURCES[metrics.eval_source] || metrics.eval_source}` : "";
  return `${result.avg_weight_bits.toFixed(3)} bits · ${primary} fp32 ${value(metrics.fp32)} → ` +
    `mixed ${value(metrics.quantized)}${verdictText(metrics)}${source}`;
}

// The "latency" column, shown once a listed job measured its plans (metrics.latency): the
// mixed plan's measured milliseconds end to end, and the latency table's prediction.
function latencyText(latency) {
  const mixed = latency && latency.plans.find((entry) => entry.plan === "mixed");
  if (!mixed || mixed.measured_ms === null) return "";
  return `${mixed.measured_ms.toFixed(3)} ms (${mixed.predicted_ms.toFixed(3)})`;
}

async function resultOf(job) {
  if (!results.has(job.id)) {
    results.set(job.id, await (await api(`/v1/jobs/${job.id}/result`)).json());
  }
  return results.get(job.id);
}

async function renderJob(tbody, job) {
  const row = tbody.insertRow();
  row.dataset.jobId = job.id;
  cell(row, job.id.slice(0, 8)).title = job.id;
  cell(row, job.spec.model);
  cell(row, job.spec.budget);
  cell(row, job.status, `status status-${job.status}`);
  const progress = cell(row, "", "progress");
  if (ACTIVE.has(job.status)) {
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = job.progress;
    progress.append(bar, ` ${Math.round(job.progress * 100)}% ${job.phase || ""}`);
  } else {
    progress.textContent = `${Math.round(job.progress * 100)}%`;
  }
  const outcome = cell(row, job.error || "", job.error ? "result error" : "result");
  const latency = cell(row, "", "latency");
  const actions = row.insertCell();
  if (job.status !== "succeeded") return;
  const result = await resultOf(job);
  outcome.textContent = summary(result);
  const measured = latencyText(result.metrics.latency);
  if (measured) {
    latency.textContent = measured;
    latency.title = `${result.metrics.latency.runtime}, input ${result.metrics.latency.input_shape.join("x")}`;
    tbody.closest("table").classList.add("with-latency");
  }
  actions.append(
    button("report", "report", () => showReport(job.id)),
    " ",
    button("re-solve", "resolve", () => chooseProfile(job, result)),
  );
}

async function refresh() {
  clearTimeout(timer);
  const mine = generation;
  try {
    const page = await (await api("/v1/jobs?limit=50")).json();
    const shown = JSON.stringify(page.jobs);
    if (shown !== lastShown) {  // rebuild only on change, so buttons stay put under the mouse
      const tbody = document.createElement("tbody");
      for (const job of page.jobs) await renderJob(tbody, job);
      if (mine !== generation) return;
      $("jobs").tBodies[0].replaceWith(tbody);
      lastShown = shown;
    }
    if (mine !== generation) return;
    $("jobs-section").hidden = false;
    $("refreshed").textContent = `(${page.jobs.length} shown, updated ${new Date().toLocaleTimeString()})`;
    if (!page.jobs.length) say("No jobs yet for this key's tenant.");
    else if (listing) say("");
    listing = false;
    const busy = page.jobs.some((job) => ACTIVE.has(job.status));
    timer = setTimeout(refresh, busy ? ACTIVE_POLL_MS : IDLE_POLL_MS);
  } catch (error) {
    if (mine !== generation) return;
    if (error instanceof ApiError && error.status === 401) {
      say("The server refused this key; enter another one.", true);
      forgetKey(false);
      return;
    }
    say(`Cannot list jobs: ${error.message}`, true);
    listing = true;
    timer = setTimeout(refresh, IDLE_POLL_MS);
  }
}

async function showReport(jobId) {
  try {
    const blob = await (await api(`/v1/jobs/${jobId}/artifacts/report`)).blob();
    if (reportUrl) URL.revokeObjectURL(reportUrl);
    reportUrl = URL.createObjectURL(new Blob([blob], { type: "text/html" }));
    $("report-job").textContent = jobId;
    $("report-frame").src = reportUrl;
    $("report-open").href = reportUrl;
    $("report-section").hidden = false;
    $("report-section").scrollIntoView();
  } catch (error) {
    say(`No report for job ${jobId}: ${error.message}`, true);
  }
}

let chosen = null;  // { job, result } whose profile the solve form re-solves

function chooseProfile(job, result) {
  chosen = { job, result };
  $("solve-job").textContent = job.id;
  $("budget").value = job.spec.budget;
  $("solve-answer").replaceChildren();
  $("solve-section").hidden = false;
  $("budget").focus();
}

async function solve(event) {
  event.preventDefault();
  if (!chosen) return;
  const answer = $("solve-answer");
  answer.replaceChildren("solving…");
  try {
    const response = await api(`/v1/profiles/${chosen.result.profile_id}/solve`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ budget: $("budget").value.trim() }),
    });
    answer.replaceChildren(renderSolution(await response.json()));
  } catch (error) {
    const line = document.createElement("p");
    line.className = "error solve-error";
    line.textContent = error.message;
    answer.replaceChildren(line);
  }
}

function renderSolution(solution) {
  const box = document.createElement("div");
  box.className = "solution";
  const head = document.createElement("p");
  const solver = solution.solver;
  const gap = solver.gap === null ? "n/a" : solver.gap.toPrecision(2);
  head.textContent = `${solution.budget}: ${solution.avg_weight_bits.toFixed(3)} bits per weight, ` +
    `${Math.round(solution.weight_bytes)} bytes · solver ${solver.name} ${solver.status} ` +
    `(gap ${gap}, ${(solver.seconds * 1000).toFixed(1)} ms)`;
  head.className = "solution-summary";
  const table = document.createElement("table");
  table.className = "allocation";
  const header = table.createTHead().insertRow();
  for (const name of ["layer", "bits", "params", "pinned"]) cell(header, name);
  const body = table.createTBody();
  for (const entry of solution.allocation) {
    const row = body.insertRow();
    cell(row, entry.layer);
    cell(row, String(entry.weight_bits), "num");
    cell(row, String(entry.params), "num");
    cell(row, entry.pinned ? "yes" : "");
  }
  box.append(head, table);
  return box;
}

function useKey(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  localStorage.setItem(KEY_STORAGE, key);
  $("key").value = "";
  start();
}

function forgetKey(clearMessage = true) {
  generation += 1;
  clearTimeout(timer);
  localStorage.removeItem(KEY_STORAGE);
  results.clear();
  lastShown = null;
  chosen = null;
  for (const id of ["jobs-section", "solve-section", "report-section", "forget-key"]) $(id).hidden = true;
  if (clearMessage) say("");
}

function start() {
  generation += 1;
  $("forget-key").hidden = false;
  say("Loading jobs…");
  listing = true;
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", useKey);
  $("forget-key").addEventListener("click", () => forgetKey());
  $("solve-form").addEventListener("submit", solve);
  if (localStorage.getItem(KEY_STORAGE)) start();
});
