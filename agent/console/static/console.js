// scopepilot operator console: one page, no build step.
// Status arrives as JSON texts on the websocket, frames as binary messages
// (4-byte little-endian header length, JSON header, uint8 pixels); actions are POSTs to /api/*.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let token = params.get("token") || sessionStorage.getItem("scopepilot-token") || "";
if (params.has("token")) {
  sessionStorage.setItem("scopepilot-token", token);
  history.replaceState(null, "", location.pathname);  // keep the token out of the address bar
}
const operatorName = () => $("operator").value.trim() || "operator";
let status = null;
let lastFrame = null;  // {header, pixels}
let lastSr = null;  // the newest sr image {header, pixels} (header.view === "sr")
let framesShown = 0;
let socket = null;
let retryMs = 500;

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.classList.add("shown");
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => box.classList.remove("shown"), 8000);
}

async function act(action, body = {}) {
  const headers = {"Content-Type": "application/json"};
  if (token) headers["Authorization"] = "Bearer " + token;
  let response;
  try {
    response = await fetch("api/" + action, {
      method: "POST", headers,
      body: JSON.stringify({operator: operatorName(), via: "console", ...body}),
    });
  } catch (err) {
    showError(`${action}: the console server cannot be reached (${err})`);
    return null;
  }
  const reply = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok) {
    showError(`${action} refused: ${reply.error}`);
    if (response.status === 401) askToken();
    return null;
  }
  return reply;
}

function askToken() {
  $("token-box").style.display = "block";
}

function connect() {
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (token) url.searchParams.set("token", token);
  socket = new WebSocket(url);
  socket.binaryType = "arraybuffer";
  socket.onopen = () => { retryMs = 500; };
  socket.onmessage = (event) => {
    if (typeof event.data === "string") {
      const message = JSON.parse(event.data);
      if (message.type === "status") { status = message.status; renderStatus(); }
      else if (message.type === "error") {
        showError(message.error);
        if (message.kind === "AuthError") { askToken(); retryMs = -1; }
      }
    } else {
      onFrame(event.data);
    }
  };
  socket.onclose = () => {
    $("state").textContent = "disconnected";
    if (retryMs > 0) { setTimeout(connect, retryMs); retryMs = Math.min(retryMs * 2, 8000); }
  };
}

function onFrame(buffer) {
  const view = new DataView(buffer);
  const n = view.getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, n)));
  const pixels = new Uint8Array(buffer, 4 + n, header.h * header.w);
  if (header.view === "sr") {
    lastSr = {header, pixels};
    const box = $("show-sr");
    if (box.disabled) {
      box.disabled = false;
      $("sr-label").title = "show the sr model's recovered image of the latest frame it judged";
    }
    if (box.checked) drawFrame();
    return;
  }
  lastFrame = {header, pixels};
  framesShown += 1;
  drawFrame();
}

function drawFrame() {
  if (!lastFrame) return;
  // The sr view shows the newest recovered image (it arrives after the frame's perception).
  const shown = $("show-sr").checked && lastSr ? lastSr : lastFrame;
  const {header, pixels} = shown;
  const canvas = $("frame");
  if (canvas.width !== header.w || canvas.height !== header.h) {
    canvas.width = header.w; canvas.height = header.h;
  }
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(header.w, header.h);
  const rgba = image.data;
  for (let i = 0, j = 0; i < pixels.length; i += 1, j += 4) {
    const v = pixels[i];
    rgba[j] = v; rgba[j + 1] = v; rgba[j + 2] = v; rgba[j + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  // Overlays (tip state, detected defects, problems), sized in screen pixels whatever the
  // frame size. A frame is pushed as soon as it is acquired, before perception has judged it:
  // renderStatus() fills in the tip and defects when the status for that frame arrives.
  const k = canvas.width / (canvas.clientWidth || canvas.width);  // frame px per screen px
  ctx.font = `${14 * k}px sans-serif`;
  const tip = header.tip;
  if (tip) {
    const text = `tip ${tip.state} (uncertainty ${tip.uncertainty.toFixed(2)})`;
    ctx.fillStyle = tip.state === "good" ? "rgba(40,160,80,0.85)" : "rgba(200,60,60,0.85)";
    ctx.fillRect(0, 0, ctx.measureText(text).width + 12 * k, 22 * k);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, 6 * k, 16 * k);
  }
  let drawn = 0;
  if ($("show-defects").checked) {
    ctx.lineWidth = 2 * k;
    const colours = {vacancy: "#ffcc00", substitution: "#33ccff", adatom: "#ff66cc", dangling_bond: "#66ff66"};
    for (const d of header.defects || []) {
      ctx.strokeStyle = colours[d.class] || "#ffcc00";
      ctx.setLineDash(d.uncertain ? [3 * k, 3 * k] : []);  // dashed: below the confidence bar
      ctx.beginPath();
      ctx.arc(d.col_px, d.row_px, 6 * k, 0, 2 * Math.PI);
      ctx.stroke();
      drawn += 1;
    }
    ctx.setLineDash([]);
  }
  $("frame").dataset.defectsDrawn = String(drawn);
  $("frame").dataset.view = header.view || "raw";
  if ((header.problems || []).length) {
    ctx.fillStyle = "rgba(200,60,60,0.85)";
    ctx.fillText(header.problems[0].slice(0, 80), 6 * k, header.h - 6 * k);
  }
  $("frame-info").textContent =
    `#${header.seq} (index ${header.frame_index}, ${header.w}×${header.h}, ${header.channel})` +
    (header.view === "sr" ? " · sr view" : "");
  $("frame-info").dataset.seq = String(header.seq);
  $("frame-info").dataset.shown = String(framesShown);
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fmt(x, digits = 2) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

// One line on what the frame stages made of the current frame (counts, rejections, sr).
function perceptionText(frame) {
  const parts = [];
  const ds = frame.defects_summary;
  if (ds) {
    const counts = Object.entries(ds.counts || {}).filter(([, n]) => n).map(([c, n]) => `${n} ${c}`);
    parts.push(ds.reject ? `defects rejected: ${ds.reason}` : `defects: ${counts.join(", ") || "none"}`);
  }
  const sr = frame.sr;
  if (sr) {
    parts.push(sr.reject ? `sr rejected: ${sr.reason}`
                         : `sr uncertainty ${(100 * sr.relative_uncertainty).toFixed(1)}% of range`);
  }
  if (frame.early_abort) parts.push(`scan aborted early at line ${frame.early_abort.lines_done}`);
  return parts.join(" · ");
}

function renderStatus() {
  const s = status;
  const state = $("state");
  state.textContent = s.state + (s.stop_reason ? ` (${s.stop_reason})` : "");
  state.className = "state " + s.state;
  state.dataset.state = s.state;
  if (document.activeElement !== $("mode")) $("mode").value = s.mode;
  $("instrument").textContent = `${s.instrument.id} · policy ${s.policy.name} ${s.policy.version} · ${s.frames} frames`;
  const holder = s.lock.holder;
  $("lock-holder").textContent = holder ? `control held by ${holder}` : "control lock free";
  $("lock").textContent = holder && holder === operatorName() ? "Release control" : "Take control";
  $("tip").textContent = s.frame && s.frame.tip ? `tip ${s.frame.tip.state}` : "";
  $("perception-info").textContent = s.frame ? perceptionText(s.frame) : "";
  if (lastFrame && s.frame && s.frame.seq === lastFrame.header.seq && !lastFrame.header.tip
      && (s.frame.tip || s.frame.defects.length || s.frame.problems.length)) {
    Object.assign(lastFrame.header,
                  {tip: s.frame.tip, defects: s.frame.defects, problems: s.frame.problems});
    drawFrame();
  }

  const pending = $("pending").tBodies[0];
  pending.replaceChildren();
  $("pending-count").textContent = String(s.pending.length);
  for (const c of s.pending) {
    const row = pending.insertRow();
    row.dataset.id = c.id;
    cell(row, c.text, "mono");
    cell(row, c.reason, "muted");
    const td = row.insertCell();
    const approve = document.createElement("button");
    approve.textContent = "Approve"; approve.className = "ok approve"; approve.dataset.id = c.id;
    approve.onclick = () => act("approve", {id: c.id});
    const veto = document.createElement("button");
    veto.textContent = "Veto"; veto.className = "danger veto"; veto.dataset.id = c.id;
    veto.onclick = () => act("veto", {id: c.id, reason: "vetoed in the console"});
    td.append(approve, " ", veto);
  }

  const decisions = $("decisions").tBodies[0];
  decisions.replaceChildren();
  for (const d of s.decisions.slice(0, 15)) {
    const row = decisions.insertRow();
    cell(row, String(d.frame));
    cell(row, d.tip || "–");
    cell(row, fmt(d.uncertainty));
    cell(row, fmt(d.confidence));
    cell(row, d.reason);
    cell(row, d.fates.map((f) => `${f.type} ${f.fate}`).join(", ") || "–", "mono");
  }

  const lat = $("latencies").tBodies[0];
  lat.replaceChildren();
  for (const [stage, v] of Object.entries(s.latencies)) {
    const row = lat.insertRow();
    cell(row, stage);
    cell(row, fmt(v.last_s * 1e3, 1)); cell(row, fmt(v.mean_s * 1e3, 1)); cell(row, fmt(v.max_s * 1e3, 1));
  }

  const ops = $("operator-log").tBodies[0];
  ops.replaceChildren();
  for (const o of s.operator.slice(0, 12)) {
    const row = ops.insertRow();
    cell(row, o.action); cell(row, o.origin, "muted"); cell(row, o.effect, o.refused ? "refused" : "");
  }

  const faults = $("faults").tBodies[0];
  faults.replaceChildren();
  for (const f of s.faults.slice(0, 8)) {
    const row = faults.insertRow();
    cell(row, f.stage || ""); cell(row, f.error || "", "mono");
  }

  const thresholds = $("thresholds").tBodies[0];
  if (thresholds.dataset.keys !== Object.keys(s.policy.thresholds).join()) {
    thresholds.replaceChildren();
    thresholds.dataset.keys = Object.keys(s.policy.thresholds).join();
    for (const [name, value] of Object.entries(s.policy.thresholds)) {
      const row = thresholds.insertRow();
      cell(row, name, "mono");
      const input = document.createElement("input");
      input.size = 8; input.value = value === null ? "" : String(value); input.dataset.name = name;
      row.insertCell().append(input);
      const set = document.createElement("button");
      set.textContent = "Set";
      set.onclick = () => {
        const raw = input.value.trim();
        const number = raw === "" ? null : Number(raw);
        if (raw !== "" && !Number.isFinite(number)) { showError(`${name}: ${raw} is not a number`); return; }
        act("thresholds", {values: {[name]: number}});
      };
      row.insertCell().append(set);
    }
  }
}

$("pause").onclick = () => act("pause");
$("resume").onclick = () => act("resume");
$("abort").onclick = () => { if (confirm("Abort the session (stop the scan and retract)?")) act("abort"); };
$("mode").onchange = () => act("mode", {mode: $("mode").value});
$("lock").onclick = () => {
  const mine = status && status.lock.holder === operatorName();
  act(mine ? "unlock" : "lock");
};
// The text goes to the server as typed: a malformed command is refused there, and recorded.
$("send").onclick = () => act("send", {command: $("command").value});
$("show-defects").onchange = drawFrame;
$("show-sr").onchange = drawFrame;
$("token-set").onclick = () => {
  token = $("token").value.trim();
  sessionStorage.setItem("scopepilot-token", token);
  $("token-box").style.display = "none";
  retryMs = 500;
  connect();
};
connect();
