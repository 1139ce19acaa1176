"""The one HTML page of ``wadi serve``: no external file, font or script, so it works offline."""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>wadi serve: one-step generation</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem;
         color: #222; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  .sub { color: #666; margin-top: 0; }
  .controls { display: flex; gap: .8rem; flex-wrap: wrap; align-items: center; margin: 1rem 0; }
  #prompt { flex: 1 1 20rem; font-size: 1.1rem; padding: .4rem .6rem; }
  #seed { width: 8rem; font-size: 1rem; padding: .3rem; }
  .panels { display: flex; gap: 2rem; flex-wrap: wrap; }
  figure { margin: 0; }
  figure img { width: 256px; height: 256px; image-rendering: pixelated; background: #eee;
               border: 1px solid #ccc; display: block; }
  figcaption { margin-top: .4rem; }
  .ms { font-variant-numeric: tabular-nums; font-weight: 600; }
  #error { color: #b00; min-height: 1.2em; }
  .hidden { display: none; }
</style>
</head>
<body>
<h1>wadi serve: one-step generation as you type</h1>
<p class="sub" id="models">loading...</p>
<div class="controls">
  <input id="prompt" type="text" autocomplete="off" autofocus
         placeholder="type a prompt, e.g. a handwritten digit seven" aria-label="prompt">
  <label>seed <input id="seed" type="number" min="0" step="1" value="0"></label>
  <button id="random" type="button">random seed</button>
  <label id="compare-label"><input id="compare" type="checkbox">
    compare with the teacher (<span id="teacher-steps">25</span> steps)</label>
</div>
<div id="error" role="alert"></div>
<div class="panels">
  <figure>
    <img id="student-img" alt="student image">
    <figcaption>student, <span id="student-steps">1</span> step:
      <span class="ms" id="student-ms">-</span></figcaption>
  </figure>
  <figure id="teacher-panel" class="hidden">
    <img id="teacher-img" alt="teacher image">
    <figcaption>teacher, <span id="teacher-steps2">25</span> steps:
      <span class="ms" id="teacher-ms">-</span> <span id="speedup"></span></figcaption>
  </figure>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const DEBOUNCE_MS = 150;
let timer = null, latest = 0, info = null;
const inflight = {student: null, teacher: null};
const last = {student: 0, teacher: 0};

function showError(text) { $("error").textContent = text || ""; }

async function request(model, prompt, seed, ticket) {
  if (inflight[model]) inflight[model].abort();
  const ctrl = new AbortController();
  inflight[model] = ctrl;
  const query = new URLSearchParams({prompt: prompt, seed: seed, model: model});
  const resp = await fetch("api/generate?" + query.toString(), {signal: ctrl.signal});
  const body = await resp.json();
  if (ticket !== latest) return false;  // a newer prompt or seed is on its way
  if (!resp.ok) { showError(body.error || ("error " + resp.status)); return false; }
  const img = $(model + "-img");
  img.src = "data:image/png;base64," + body.png;
  img.dataset.prompt = prompt;
  img.dataset.seed = String(seed);
  $(model + "-ms").textContent = body.ms.toFixed(1) + " ms";
  last[model] = body.ms;
  if (model === "teacher" && last.student > 0) {
    $("speedup").textContent = "(" + (body.ms / last.student).toFixed(0) + "x the student's time)";
  }
  return true;
}

async function run() {
  const ticket = ++latest;
  const prompt = $("prompt").value;
  const seed = $("seed").value.trim() === "" ? "0" : $("seed").value.trim();
  showError("");
  try {
    const ok = await request("student", prompt, seed, ticket);
    if (ok && info && info.teacher && $("compare").checked) {
      await request("teacher", prompt, seed, ticket);
    }
  } catch (err) {
    if (err.name !== "AbortError") showError(String(err));
  }
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(run, DEBOUNCE_MS);
}

$("prompt").addEventListener("input", schedule);
$("seed").addEventListener("input", schedule);
$("random").addEventListener("click", () => {
  $("seed").value = Math.floor(Math.random() * 1e9);
  schedule();
});
$("compare").addEventListener("change", () => {
  $("teacher-panel").classList.toggle("hidden", !$("compare").checked);
  schedule();
});

fetch("api/info").then((r) => r.json()).then((data) => {
  info = data;
  $("student-steps").textContent = data.student_steps;
  let text = "student: " + data.student + " (" + data.size + " px)";
  if (data.teacher) {
    text += "; teacher: " + data.teacher + ", " + data.teacher_steps + " DDIM steps, CFG "
      + data.guidance;
    $("teacher-steps").textContent = data.teacher_steps;
    $("teacher-steps2").textContent = data.teacher_steps;
  } else {
    $("compare").disabled = true;
    $("compare-label").title = "start wadi serve with --teacher DIR to compare";
    text += "; no teacher loaded (start with --teacher DIR to compare)";
  }
  $("models").textContent = text;
  run();
}).catch((err) => showError("cannot reach the server: " + err));
</script>
</body>
</html>
"""
