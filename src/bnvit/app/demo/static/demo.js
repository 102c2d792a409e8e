// The drawing page of `bnvit demo`: strokes on a canvas, sent as a PNG to POST /api/predict while
// the person draws (one request in flight at a time, the latest drawing sent next), and the
// answers shown as one bar chart of the ten class probabilities per model.
"use strict";

const BRUSH = 20;        // stroke width in CSS pixels on the 280-pixel canvas (an MNIST stroke, scaled)
const DEBOUNCE_MS = 80;  // wait this long after the last change before asking the server
const BAR_PX = 130;      // height of a bar at probability 1

const canvas = document.getElementById("canvas");
const ctx = canvas.getContext("2d");
const statusLine = document.getElementById("status");
const inputCanvas = document.getElementById("input");
const strokes = [];      // each stroke: [[x, y], ...] in CSS pixels
let current = null;      // the stroke being drawn
let version = 0;         // bumped by every change of the drawing
let inFlight = false;
let timer = null;
const panels = [];

function setStatus(state, text) {
  statusLine.dataset.state = state;
  statusLine.textContent = text;
}

// ------------------------------------------------------------------ drawing

function setUpCanvas() {
  const ratio = Math.min(window.devicePixelRatio || 1, 3.5);  // the server takes at most 1024x1024 pixels
  const { width, height } = canvas.getBoundingClientRect();
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  redraw();
}

function paintStroke(points) {
  ctx.strokeStyle = ctx.fillStyle = "#000";
  ctx.lineWidth = BRUSH;
  ctx.lineCap = ctx.lineJoin = "round";
  if (points.length === 1) {
    ctx.beginPath();
    ctx.arc(points[0][0], points[0][1], BRUSH / 2, 0, 2 * Math.PI);
    ctx.fill();
    return;
  }
  ctx.beginPath();
  ctx.moveTo(points[0][0], points[0][1]);
  for (const [x, y] of points.slice(1)) ctx.lineTo(x, y);
  ctx.stroke();
}

function redraw() {
  ctx.save();
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.restore();
  for (const points of strokes) paintStroke(points);
}

function point(event) {
  const rect = canvas.getBoundingClientRect();
  return [event.clientX - rect.left, event.clientY - rect.top];
}

canvas.addEventListener("pointerdown", (event) => {
  if (current || (event.button !== 0 && event.pointerType === "mouse")) return;  // one pointer at a time
  event.preventDefault();
  canvas.setPointerCapture(event.pointerId);
  canvas.dataset.pointer = event.pointerType;  // mouse, pen or touch: what drew the last stroke
  current = [point(event)];
  strokes.push(current);
  paintStroke(current);
  changed();
});

canvas.addEventListener("pointermove", (event) => {
  if (!current) return;
  const coalesced = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  const from = current.length - 1;
  for (const e of coalesced.length ? coalesced : [event]) current.push(point(e));
  paintStroke(current.slice(from));
  changed();
});

function endStroke() {
  if (!current) return;
  current = null;
  changed();
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);
canvas.addEventListener("lostpointercapture", endStroke);

function undo() {
  if (current || !strokes.length) return;
  strokes.pop();
  redraw();
  changed();
}

function clearDrawing() {
  current = null;
  strokes.length = 0;
  redraw();
  changed();
}

document.getElementById("undo").addEventListener("click", undo);
document.getElementById("clear").addEventListener("click", clearDrawing);
document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "z") { event.preventDefault(); undo(); }
  if (event.key === "Escape") clearDrawing();
});

// ------------------------------------------------------------------ predictions

function changed() {
  version += 1;
  canvas.dataset.version = String(version);  // with data-version on #status: which drawing the page shows
  canvas.dataset.strokes = String(strokes.length);
  if (!strokes.length) {
    clearTimeout(timer);
    showEmpty();
    return;
  }
  setStatus("busy", "Classifying\u2026");
  clearTimeout(timer);
  timer = setTimeout(send, DEBOUNCE_MS);
}

async function send() {
  if (inFlight || !strokes.length) return;  // the answer to the request in flight sends the next
  inFlight = true;
  const sent = version;
  try {
    const response = await fetch("api/predict", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image: canvas.toDataURL("image/png") }),
    });
    const answer = await response.json();
    if (sent === version && strokes.length) {
      if (response.ok) show(answer);
      else showProblem(answer.error || `the server answered ${response.status}`);
      statusLine.dataset.version = String(sent);
    }
  } catch (error) {
    if (sent === version) showProblem(`no answer from the server (${error.message}); is bnvit demo still running?`);
  } finally {
    inFlight = false;
    if (version !== sent && strokes.length) send();
  }
}

function show(answer) {
  answer.models.forEach((result, i) => panels[i] && updatePanel(panels[i], result));  // panels: once /api/models answered
  drawInput(answer.input);
  const names = answer.models.map((r) => `${r.digit} (${(100 * r.probability).toFixed(1)}%)`).join(" vs ");
  if (answer.one_digit === false) setStatus("doubt", `Not one digit? ${answer.not_one_digit}. The model's guess: ${names}`);
  else setStatus("ready", `Prediction: ${names}`);
}

function showProblem(message) {
  for (const panel of panels) updatePanel(panel, null);
  setStatus("error", message);
}

function showEmpty() {
  for (const panel of panels) updatePanel(panel, null);
  drawInput(null);
  setStatus("idle", "Draw a digit to start.");
  statusLine.dataset.version = String(version);
}

function drawInput(rows) {
  const c = inputCanvas.getContext("2d");
  const image = c.createImageData(28, 28);
  for (let i = 0; i < 28 * 28; i++) {
    const v = rows ? rows[Math.floor(i / 28)][i % 28] : 0;
    image.data.set([v, v, v, 255], 4 * i);
  }
  c.putImageData(image, 0, 0);
}

// ------------------------------------------------------------------ charts

function makePanel(model, index) {
  const node = document.getElementById("model-template").content.firstElementChild.cloneNode(true);
  node.id = `model-${index}`;
  node.querySelector(".name").textContent = model.name;
  node.querySelector(".description").textContent = model.description;
  const chart = node.querySelector(".chart");
  chart.setAttribute("aria-label", `Probabilities of the ten digits for ${model.name}`);
  const columns = [];
  for (let d = 0; d < 10; d++) {
    const column = document.createElement("div");
    column.className = "column";
    column.innerHTML = '<span class="value"></span><div class="bar"></div><span class="label"></span>';
    column.querySelector(".label").textContent = String(d);
    chart.appendChild(column);
    columns.push(column);
  }
  document.getElementById("models").appendChild(node);
  return { node, columns, digit: node.querySelector(".digit"), probability: node.querySelector(".probability") };
}

function updatePanel(panel, result) {
  panel.digit.textContent = result ? String(result.digit) : "\u2013";
  panel.digit.dataset.digit = result ? String(result.digit) : "";
  panel.probability.textContent = result ? `${(100 * result.probability).toFixed(1)}% sure` : "";
  panel.columns.forEach((column, d) => {
    const p = result ? result.probabilities[d] : 0;
    column.querySelector(".bar").style.height = `${Math.round(p * BAR_PX)}px`;
    column.querySelector(".value").textContent = result && p >= 0.005 ? `${Math.round(100 * p)}%` : "";
    column.classList.toggle("top", Boolean(result) && d === result.digit);
  });
}

async function start() {
  setUpCanvas();
  drawInput(null);
  try {
    const response = await fetch("api/models");
    const info = await response.json();
    info.models.forEach((model, i) => panels.push(makePanel(model, i)));
    document.body.dataset.ready = "true";
  } catch (error) {
    setStatus("error", `cannot reach the server (${error.message})`);
  }
}

start();
