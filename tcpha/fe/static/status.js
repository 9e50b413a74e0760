// tcpha-fe status page: polls /status.json once a second and redraws. Everything shown that comes from
// the front end (back end names, rule text, request heads) is set with textContent, never as HTML.
"use strict";

const POLL_MS = 1000;
let lastDoc = null;

function $(id) { return document.getElementById(id); }

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function duration(s) {
  if (s === null || s === undefined) return "-";
  if (s < 60) return s.toFixed(0) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}

function fillBody(table, rows, build) {
  const body = $(table).tBodies[0];
  const fresh = document.createElement("tbody");
  rows.forEach(r => fresh.appendChild(build(r)));
  body.replaceWith(fresh);
}

function render(doc) {
  lastDoc = doc;
  document.body.classList.toggle("writable", !!doc.statsadmin);
  $("vip").textContent = doc.vaddr + " ports " + doc.ports.join(" ");
  $("pid").textContent = doc.pid;
  $("uptime").textContent = duration(doc.uptime);
  $("nworkers").textContent = doc.workers.length;
  $("handoffs").textContent = doc.handoffs;
  $("rate").textContent = doc.handoffs_per_s.toFixed(1);
  $("flows").textContent = doc.flows;
  $("steering").textContent = doc.steering_entries === null ? "-" : doc.steering_entries;
  $("tls").textContent = doc.tls_session_cache === null ? "no session looked up" :
    (100 * doc.tls_session_cache.hit_rate).toFixed(1) + "% hits (" + doc.tls_session_cache.hits + " of " +
    doc.tls_session_cache.lookups + " offered sessions resumed)";

  fillBody("backends", doc.backends, b => {
    const tr = document.createElement("tr");
    tr.className = b.status;
    tr.dataset.backend = b.name;
    cell(tr, b.name);
    cell(tr, b.status === "drain" ? "draining" : b.status, "state");
    cell(tr, duration(b.since_seconds), "num");
    const check = b.checks === 0 ? "not yet" :
      (b.last_error ? "failed" : "ok") + " (" + b.checks + " checks, " + b.failures + " failed" +
      (b.rtt_ms !== null ? ", rtt " + b.rtt_ms.toFixed(2) + " ms" : "") + ")";
    cell(tr, check, "check");
    cell(tr, b.weight, "num");
    cell(tr, b.handoffs_per_s.toFixed(1), "num rate");
    cell(tr, b.refused_per_s.toFixed(1), "num");
    cell(tr, b.handoffs, "num handoffs");
    cell(tr, b.flows, "num");
    cell(tr, b.last_error || "", "error");
    const td = cell(tr, "", "admin");
    const button = document.createElement("button");
    const draining = b.drain;
    button.textContent = draining ? "enable" : "drain";
    button.className = draining ? "enable" : "drain";
    button.addEventListener("click", () => adminWrite(b.name, draining ? "enable" : "drain"));
    td.appendChild(button);
    return tr;
  });

  fillBody("rules", doc.rules, r => {
    const tr = document.createElement("tr");
    cell(tr, doc.rules.indexOf(r) + 1, "num");
    cell(tr, r.text, "rule");
    cell(tr, r.target);
    cell(tr, r.hits, "num");
    return tr;
  });

  fillBody("workers", doc.worker_stats, w => {
    const tr = document.createElement("tr");
    cell(tr, w.pid, "num");
    cell(tr, w.accepted, "num");
    cell(tr, w.dispatching, "num");
    cell(tr, w.flows, "num");
    return tr;
  });

  fillBody("answers", doc.answers.slice().reverse(), a => {
    const tr = document.createElement("tr");
    cell(tr, new Date(a.time * 1000).toLocaleTimeString());
    cell(tr, a.client);
    cell(tr, a.status, "num");
    cell(tr, a.why);
    cell(tr, a.head, "head");
    return tr;
  });

  drawChart(doc.history);
}

function drawChart(series) {
  // x: the last minute at least, growing with the samples kept (up to the front end's ten minutes)
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 50, right = 30, bottom = 20;
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#666";
  ctx.strokeStyle = "#ddd";
  const now = series.length ? series[series.length - 1][0] : 0;
  const kept = series.length ? now - series[0][0] : 0;
  const span = Math.min(600, Math.max(60, Math.ceil(kept / 60) * 60));
  let max = 1;
  series.forEach(p => { if (p[1] > max) max = p[1]; });
  const magnitude = Math.pow(10, Math.floor(Math.log10(max)));
  max = Math.ceil(max / magnitude) * magnitude;
  const xOf = t => left + (w - left - right) * (1 - (now - t) / span);
  const yOf = v => 5 + (h - bottom - 5) * (1 - v / max);
  for (let i = 0; i <= 2; i++) {
    const y = yOf(max * i / 2);
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(w - right, y); ctx.stroke();
    ctx.fillText(String(Math.round(max * i / 2)), 4, y + 4);
  }
  const step = span / 6;
  for (let ago = 0; ago <= span + 0.1; ago += step) {
    const label = ago === 0 ? "now" : "-" + (span <= 60 ? Math.round(ago) + " s" :
      (ago / 60).toFixed(ago % 60 ? 1 : 0) + " min");
    ctx.textAlign = ago === 0 ? "right" : (ago >= span - 0.1 ? "left" : "center");
    ctx.fillText(label, xOf(now - ago), h - 5);
  }
  ctx.textAlign = "left";
  if (series.length < 2) return;
  ctx.strokeStyle = "#2a6fdb";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  series.forEach((p, i) => {
    if (i === 0) ctx.moveTo(xOf(p[0]), yOf(p[1])); else ctx.lineTo(xOf(p[0]), yOf(p[1]));
  });
  ctx.stroke();
  ctx.lineWidth = 1;
}

async function poll() {
  try {
    const r = await fetch("/status.json", {cache: "no-store"});
    if (!r.ok) throw new Error("status " + r.status);
    render(await r.json());
    $("connection").textContent = "updated " + new Date().toLocaleTimeString();
    $("connection").className = "ok";
  } catch (e) {
    $("connection").textContent = "no answer from the front end (" + e.message + "), retrying";
    $("connection").className = "stale";
  }
  setTimeout(poll, POLL_MS);
}

// -- write mode: HMAC-SHA256 by hand (crypto.subtle exists only in secure contexts, and this page is
// usually plain http on a LAN address) -------------------------------------------------------------
const K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2]);

function sha256(bytes) {
  const bitLen = bytes.length * 8;
  const padded = new Uint8Array(((bytes.length + 9 + 63) >> 6) << 6);
  padded.set(bytes);
  padded[bytes.length] = 0x80;
  const view = new DataView(padded.buffer);
  view.setUint32(padded.length - 8, Math.floor(bitLen / 0x100000000));
  view.setUint32(padded.length - 4, bitLen >>> 0);
  const H = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                             0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const W = new Uint32Array(64);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  for (let off = 0; off < padded.length; off += 64) {
    for (let i = 0; i < 16; i++) W[i] = view.getUint32(off + 4 * i);
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(W[i - 15], 7) ^ rotr(W[i - 15], 18) ^ (W[i - 15] >>> 3);
      const s1 = rotr(W[i - 2], 17) ^ rotr(W[i - 2], 19) ^ (W[i - 2] >>> 10);
      W[i] = (W[i - 16] + s0 + W[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, h] = H;
    for (let i = 0; i < 64; i++) {
      const t1 = (h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + W[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      h = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    H[0] += a; H[1] += b; H[2] += c; H[3] += d; H[4] += e; H[5] += f; H[6] += g; H[7] += h;
  }
  const out = new Uint8Array(32);
  const ov = new DataView(out.buffer);
  for (let i = 0; i < 8; i++) ov.setUint32(4 * i, H[i]);
  return out;
}

function hmacSha256Hex(keyText, message) {
  const enc = new TextEncoder();
  let key = enc.encode(keyText);
  if (key.length > 64) key = sha256(key);
  const inner = new Uint8Array(64 + message.length), outer = new Uint8Array(64 + 32);
  for (let i = 0; i < 64; i++) {
    const k = i < key.length ? key[i] : 0;
    inner[i] = k ^ 0x36;
    outer[i] = k ^ 0x5c;
  }
  inner.set(message, 64);
  outer.set(sha256(inner), 64);
  return Array.from(sha256(outer), x => x.toString(16).padStart(2, "0")).join("");
}

async function adminWrite(backend, action) {
  const msg = $("adminmsg");
  const body = JSON.stringify({backend: backend, action: action});
  const headers = {"Content-Type": "application/json"};
  try {
    const token = $("token").value.trim();
    if (token) {
      const n = await fetch("/admin/nonce", {cache: "no-store"});
      const nonce = (await n.json()).nonce;
      if (!n.ok || !nonce) throw new Error("no nonce (status " + n.status + ")");
      const enc = new TextEncoder();
      const head = enc.encode(nonce + "\nPOST\n/admin\n"), data = enc.encode(body);
      const signed = new Uint8Array(head.length + data.length);
      signed.set(head); signed.set(data, head.length);
      headers["X-Tcpha-Auth"] = nonce + " " + hmacSha256Hex(token, signed);
    }
    const r = await fetch("/admin", {method: "POST", headers: headers, body: body});
    const answer = await r.json();
    msg.textContent = r.ok ? action + " " + backend + ": done" :
      action + " " + backend + " refused (" + r.status + "): " + answer.error;
    msg.className = r.ok ? "ok" : "error";
  } catch (e) {
    msg.textContent = action + " " + backend + " failed: " + e.message;
    msg.className = "error";
  }
}

document.addEventListener("DOMContentLoaded", poll);
