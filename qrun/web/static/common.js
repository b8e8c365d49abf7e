// What every page of the dashboard shares: building elements, fetching the JSON API, polling while the
// tab is visible, and the texts `qrun status` gives a job's cells.
"use strict";

const qrun = {
  POLL_MS: 2000,

  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  },

  async getJSON(url) {
    const response = await fetch(url, {cache: "no-store", headers: {accept: "application/json"}});
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
    return body;
  },

  problem(text) {
    const box = document.getElementById("problem");
    if (box) box.textContent = text || "";
  },

  stamp() {
    const node = document.getElementById("updated");
    if (node) node.textContent = "updated " + new Date().toLocaleTimeString();
  },

  // Call load() now and every POLL_MS while the tab is visible, until it returns false.
  poll(load) {
    let timer = null;
    const tick = async () => {
      timer = null;
      let again = true;
      try {
        again = (await load()) !== false;
        qrun.problem("");
        qrun.stamp();
      } catch (err) {
        qrun.problem(String(err.message || err));
      }
      if (again && !document.hidden) timer = setTimeout(tick, qrun.POLL_MS);
      else if (again) qrun.resume = tick;
    };
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && qrun.resume && timer === null) { const go = qrun.resume; qrun.resume = null; go(); }
    });
    tick();
    return {now: () => { if (timer !== null) clearTimeout(timer); tick(); }};
  },

  // ---- texts, as `qrun status` writes its cells
  clock(seconds) {
    const s = Math.round(seconds), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    const two = (n) => String(n).padStart(2, "0");
    return h ? `${h}:${two(m)}:${two(r)}` : `${m}:${two(r)}`;
  },
  elapsed(seconds) {
    if (seconds === null || seconds === undefined) return "";
    return seconds < 60 ? `${seconds.toFixed(1)}s` : qrun.clock(seconds);
  },
  localTime(iso) {
    if (!iso) return "";
    const when = new Date(iso);
    return isNaN(when) ? iso : when.toLocaleString();
  },
  ago(seconds) {
    const s = Math.floor(seconds);
    if (s < 90) return `${s}s ago`;
    if (s < 5400) return `${Math.floor(s / 60)}m ago`;
    return `${Math.floor(s / 3600)}h ago`;
  },
  firstLine(text) { return text ? text.trim().split("\n")[0] : ""; },
  bytes(n) {
    if (n === null || n === undefined) return "";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let value = n, unit = 0;
    while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
    return unit ? `${value.toFixed(1)} ${units[unit]}` : `${value} B`;
  },
  reason(row) {
    if (row.status !== "queued") return "";
    if (row.reason !== null && row.reason !== undefined) {
      return row.position !== null && row.position !== undefined ? `#${row.position} · ${row.reason}` : row.reason;
    }
    if (row.preparing) return `preparing on ${row.preparing.worker}: ${row.preparing.doing}`;
    return row.depends_on ? `after job ${row.depends_on}` : "";
  },
  progress(row) {
    if (row.preparing && row.status !== "queued") return `preparing on ${row.preparing.worker}: ${row.preparing.doing}`;
    const p = row.progress || {};
    if (row.status === "queued" || !p.total) return "";
    let text = `${p.unit} ${p.done}/${p.total}`;
    if (row.status !== "running") return text;
    text += ` · ${p.percent}%`;
    return p.eta_s !== null && p.eta_s !== undefined ? `${text} · ETA ${qrun.clock(p.eta_s)}` : text;
  },
  gpu(row) { return row.gpu || (row.worker ? "cpu" : ""); },
};

// Times written by the server as UTC (<time datetime=...>) shown in the reader's local time.
document.querySelectorAll("time[datetime]").forEach((node) => {
  node.title = node.getAttribute("datetime");
  node.textContent = qrun.localTime(node.getAttribute("datetime"));
});
