// The drawing page: strokes in Quick, Draw!'s simplified format ([[xs], [ys]] per stroke, canvas
// pixels), sent to POST /api/predict at most every INTERVAL ms while drawing, and once more when
// the drawing stops changing. No framework, no build step.
"use strict";

const INTERVAL = 100; // ms between requests: at most ~10 a second
const MIN_STEP = 2; // canvas px between kept points (Google simplified its strokes with RDP, epsilon 2)
const canvas = document.getElementById("canvas");
const ctx = canvas.getContext("2d");
const seen = document.getElementById("seen").getContext("2d");
const guesses = document.getElementById("guesses");
const statusLine = document.getElementById("status");

let strokes = []; // finished strokes, each [[x...], [y...]]
let current = null; // the stroke being drawn
let pointer = null; // the pointer drawing it: a second finger neither starts nor joins a stroke
let version = 0; // bumps on every change of the drawing
let shown = -1; // the version the guesses on the page are for
let inFlight = false;
let lastSent = 0;
let timer = null;

function point(event) {
  const box = canvas.getBoundingClientRect();
  // Clamped: pointer capture follows a stroke off the canvas, and the model sees only what is shown.
  const x = Math.min(Math.max(((event.clientX - box.left) * canvas.width) / box.width, 0), canvas.width);
  const y = Math.min(Math.max(((event.clientY - box.top) * canvas.height) / box.height, 0), canvas.height);
  return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
}

function redraw() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = "#000";
  ctx.lineWidth = 6;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  for (const [xs, ys] of current ? [...strokes, current] : strokes) {
    ctx.beginPath();
    ctx.moveTo(xs[0], ys[0]);
    for (let i = 1; i < xs.length; i++) ctx.lineTo(xs[i], ys[i]);
    if (xs.length === 1) ctx.lineTo(xs[0] + 0.01, ys[0]);
    ctx.stroke();
  }
}

function changed() {
  version += 1;
  redraw();
  schedule();
}

canvas.addEventListener("pointerdown", (event) => {
  if (event.button !== 0 || current) return;
  pointer = event.pointerId;
  try {
    canvas.setPointerCapture(event.pointerId); // keep the stroke when the pointer leaves the canvas
  } catch {
    // a pointer the browser no longer tracks: the stroke just ends at the canvas's edge
  }
  const [x, y] = point(event);
  current = [[x], [y]];
  changed();
});

canvas.addEventListener("pointermove", (event) => {
  if (!current || event.pointerId !== pointer) return;
  const [x, y] = point(event);
  const [xs, ys] = current;
  if (Math.hypot(x - xs[xs.length - 1], y - ys[ys.length - 1]) < MIN_STEP) return;
  xs.push(x);
  ys.push(y);
  changed();
});

function endStroke(event) {
  if (!current || event.pointerId !== pointer) return;
  strokes.push(current);
  current = null;
  pointer = null;
  changed();
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

document.getElementById("clear").addEventListener("click", () => {
  strokes = [];
  current = null;
  pointer = null;
  changed();
});

document.getElementById("undo").addEventListener("click", () => {
  strokes.pop();
  changed();
});

function drawing() {
  return current ? [...strokes, current] : strokes;
}

// Send the drawing now if no request is out and the last went INTERVAL ms ago; else try again then.
function schedule() {
  if (timer !== null) return;
  const wait = Math.max(0, lastSent + INTERVAL - performance.now());
  timer = setTimeout(() => {
    timer = null;
    send();
  }, wait);
}

async function send() {
  if (inFlight || shown === version) return;
  const asked = version;
  if (drawing().length === 0) {
    show(asked, null);
    return;
  }
  inFlight = true;
  const body = JSON.stringify({ strokes: drawing() });
  lastSent = performance.now(); // as the request leaves: the next leaves INTERVAL ms after it
  try {
    const response = await fetch("api/predict", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body,
    });
    const answer = await response.json();
    if (!response.ok) {
      refused(asked, `The server refused this drawing: ${answer.error || response.statusText}`);
    } else {
      show(asked, answer);
    }
  } catch (error) {
    refused(asked, `The server did not answer: ${error.message}`);
  } finally {
    inFlight = false;
    if (shown !== version) schedule();
  }
}

function refused(asked, why) {
  if (asked < shown) return;
  shown = asked;
  statusLine.textContent = why;
  statusLine.className = "error";
}

function show(asked, answer) {
  if (asked < shown) return;
  shown = asked;
  guesses.replaceChildren();
  seen.clearRect(0, 0, 28, 28);
  statusLine.className = "muted";
  if (answer === null) {
    statusLine.textContent = "Draw on the canvas with a mouse, pen or finger.";
    return;
  }
  statusLine.textContent = "";
  for (const { label, probability } of answer.top_k) {
    const item = document.createElement("li");
    item.dataset.label = label;
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label.replaceAll("_", " ");
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(probability * 100).toFixed(1)}%`;
    bar.append(fill);
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = `${(probability * 100).toFixed(1)} %`;
    item.append(name, bar, prob);
    guesses.append(item);
  }
  const image = seen.createImageData(28, 28);
  answer.bitmap.forEach((v, i) => {
    image.data.set([v, v, v, 255], i * 4);
  });
  seen.putImageData(image, 0, 0);
}

async function describe() {
  const model = document.getElementById("model");
  try {
    const info = await (await fetch("api/model")).json();
    const name = info.registered ? `registered model ${info.registered}` : info.source;
    const run = info.run_id ? `, run ${info.run_id}` : "";
    const calibrated = info.temperature !== 1 ? `, calibrated (temperature ${info.temperature.toFixed(2)})` : "";
    model.textContent = `Model: ${name}${run} (${info.backend}${calibrated})`;
    document.getElementById("classes").textContent = info.class_names.map((c) => c.replaceAll("_", " ")).join(", ");
    document.body.dataset.ready = "true";
  } catch (error) {
    model.textContent = `The model could not be described: ${error.message}`;
    model.className = "error";
  }
}

redraw();
describe();
