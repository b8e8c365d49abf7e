// The comparison's trade-off chart, drawn as inline SVG from the points the page carries (qrun.plotting's
// plot_points: Pareto front, max-drop band, the pick): metric against size on disk, one colour per method,
// the baseline a star. Hovering a point names its variant. Labels never print over each other: where sizes
// are equal, they are stacked beside their points, each tied to its point by a thin line.
"use strict";

(function () {
  const W = 760, H = 440, M = {left: 64, right: 24, top: 18, bottom: 48};
  const PALETTE = ["#1f77b4", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
                   "#2ca02c", "#ff7f0e"];
  const LINE = 15;  // a label's height and the step between stacked labels, px

  function niceStep(range, count) {
    const raw = range / Math.max(count, 1), power = Math.pow(10, Math.floor(Math.log10(raw)));
    const factor = raw / power;
    return power * (factor < 1.5 ? 1 : factor < 3.5 ? 2 : factor < 7.5 ? 5 : 10);
  }

  function linearTicks(lo, hi, count) {
    const step = niceStep(hi - lo, count), ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
    return ticks;
  }

  function logTicks(lo, hi) {
    const ticks = [];
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
      for (const m of [1, 2, 5]) {
        const v = m * Math.pow(10, e);
        if (v >= lo && v <= hi) ticks.push(Number(v.toPrecision(12)));
      }
    }
    return ticks.length >= 2 ? ticks : linearTicks(lo, hi, 5);
  }

  function tickText(v) {
    return Math.abs(v) >= 1000 || v === 0 ? String(v) : String(Number(v.toPrecision(3)));
  }

  function padded(values, share, floor) {
    let lo = Math.min(...values), hi = Math.max(...values);
    const pad = hi > lo ? (hi - lo) * share : Math.max(Math.abs(hi) * 0.05, floor);
    return [lo - pad, hi + pad];
  }

  function scales(chart) {
    const sizes = chart.points.map((p) => p.size_mb);
    const log = Math.min(...sizes) > 0 && Math.max(...sizes) / Math.min(...sizes) > 10;
    let xlo, xhi;
    if (log) { xlo = Math.min(...sizes) / 1.3; xhi = Math.max(...sizes) * 1.3; }
    else { [xlo, xhi] = padded(sizes, 0.08, 0.05); xlo = Math.max(xlo, 0); }
    const values = chart.points.map((p) => p.value).concat(chart.band || []);
    const [ylo, yhi] = padded(values, 0.1, 0.01);
    const pw = W - M.left - M.right, ph = H - M.top - M.bottom;
    const x = log ? (v) => M.left + (Math.log(v) - Math.log(xlo)) / (Math.log(xhi) - Math.log(xlo)) * pw
                  : (v) => M.left + (v - xlo) / (xhi - xlo) * pw;
    // better is up: for a metric where lower is better (perplexity) the axis runs the other way
    const y = chart.lower_is_better ? (v) => M.top + (v - ylo) / (yhi - ylo) * ph
                                    : (v) => M.top + (yhi - v) / (yhi - ylo) * ph;
    return {x, y, log, xTicks: log ? logTicks(xlo, xhi) : linearTicks(xlo, xhi, 6), yTicks: linearTicks(ylo, yhi, 6)};
  }

  function make(svg, tag, attrs, parent) {
    const node = document.createElementNS(svg.namespaceURI, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    (parent || svg).append(node);
    return node;
  }

  function star(cx, cy, r) {
    const corners = [];
    for (let i = 0; i < 10; i++) {
      const radius = i % 2 ? r * 0.45 : r, angle = -Math.PI / 2 + i * Math.PI / 5;
      corners.push(`${(cx + radius * Math.cos(angle)).toFixed(1)},${(cy + radius * Math.sin(angle)).toFixed(1)}`);
    }
    return "M" + corners.join("L") + "Z";
  }

  function axes(svg, s) {
    const grid = make(svg, "g", {class: "grid"}), axis = make(svg, "g", {class: "axis"});
    const bottom = H - M.bottom, right = W - M.right;
    for (const v of s.xTicks) {
      const px = s.x(v);
      make(svg, "line", {x1: px, x2: px, y1: M.top, y2: bottom}, grid);
      make(svg, "line", {x1: px, x2: px, y1: bottom, y2: bottom + 5}, axis);
      make(svg, "text", {x: px, y: bottom + 18, "text-anchor": "middle"}, axis).textContent = tickText(v);
    }
    for (const v of s.yTicks) {
      const py = s.y(v);
      make(svg, "line", {x1: M.left, x2: right, y1: py, y2: py}, grid);
      make(svg, "line", {x1: M.left - 5, x2: M.left, y1: py, y2: py}, axis);
      make(svg, "text", {x: M.left - 8, y: py + 4, "text-anchor": "end"}, axis).textContent = tickText(v);
    }
    make(svg, "path", {d: `M${M.left},${M.top}V${bottom}H${right}`, fill: "none"}, axis);
  }

  function axisNames(svg, chart, s) {
    const names = make(svg, "g", {class: "axis"});
    make(svg, "text", {x: M.left + (W - M.left - M.right) / 2, y: H - 8, "text-anchor": "middle"}, names)
      .textContent = "size on disk (MB)" + (s.log ? ", log scale" : "");
    const cy = M.top + (H - M.top - M.bottom) / 2;
    make(svg, "text", {x: 16, y: cy, "text-anchor": "middle", transform: `rotate(-90 16 ${cy})`}, names)
      .textContent = chart.metric_name + (chart.lower_is_better ? " (lower is better)" : "");
  }

  function band(svg, chart, s) {
    if (!chart.band) return;
    const [a, b] = chart.band.map(s.y);
    make(svg, "rect", {class: "band", x: M.left, width: W - M.left - M.right, y: Math.min(a, b),
                       height: Math.max(Math.abs(b - a), 1)});
  }

  function front(svg, chart, s) {
    const points = chart.points.filter((p) => p.pareto).sort((a, b) => a.size_mb - b.size_mb);
    if (points.length < 2) return;
    let d = `M${s.x(points[0].size_mb).toFixed(1)},${s.y(points[0].value).toFixed(1)}`;
    for (const p of points.slice(1)) d += `H${s.x(p.size_mb).toFixed(1)}V${s.y(p.value).toFixed(1)}`;
    make(svg, "path", {class: "front", d});
  }

  function tipText(chart, p) {
    const share = p.size_pct !== null && !p.baseline ? ` (${p.size_pct.toFixed(1)}% of baseline)` : "";
    const size = `${p.size_mb.toFixed(2)} MB${share}`;
    const delta = p.delta_text && !p.baseline ? ` (${p.delta_text})` : "";
    const value = `${chart.metric_name} ${Number(p.value.toFixed(4))}${delta}`;
    const lines = [p.variant, p.baseline ? "baseline (unquantized)" : `method ${p.method}`, size, value];
    if (p.pick) lines.push(`smallest within ${chart.max_drop} of the baseline`);
    else if (p.within === true && !p.baseline) lines.push(`within ${chart.max_drop} of the baseline`);
    if (p.pareto) lines.push("on the Pareto front");
    if (p.job_id) lines.push(`eval job ${p.job_id} (click to open)`);
    return lines;
  }

  function hover(container, node, lines) {
    const tip = container.querySelector(".tip");
    node.addEventListener("pointerenter", () => {
      tip.replaceChildren(...lines.map((line, i) => {
        const row = document.createElement("div");
        row.append(i ? line : Object.assign(document.createElement("b"), {textContent: line}));
        return row;
      }));
      const box = node.getBoundingClientRect(), frame = container.getBoundingClientRect();
      tip.classList.add("shown");
      const left = box.right - frame.left + 10, top = box.top - frame.top - 6;
      tip.style.left = `${Math.min(left, frame.width - tip.offsetWidth - 4)}px`;
      tip.style.top = `${Math.max(top, 0)}px`;
      node.classList.add("hot");
    });
    node.addEventListener("pointerleave", () => { tip.classList.remove("shown"); node.classList.remove("hot"); });
  }

  function points(svg, container, chart, s, colour) {
    const layer = make(svg, "g", {class: "points"});
    // the baseline last, on top; larger points first, so that nothing hides a smaller one's centre
    const order = chart.points.slice().sort((a, b) => (a.baseline - b.baseline) || (b.size_mb - a.size_mb));
    for (const p of order) {
      const px = s.x(p.size_mb), py = s.y(p.value);
      const attrs = {class: "point", "data-variant": p.variant, "data-method": p.method, fill: colour(p),
                     "aria-label": tipText(chart, p).join(", ")};
      const node = p.baseline ? make(svg, "path", {...attrs, d: star(px, py, 10)}, layer)
                              : make(svg, "circle", {...attrs, cx: px.toFixed(1), cy: py.toFixed(1), r: 6}, layer);
      if (p.pick) make(svg, "circle", {class: "pick-ring", cx: px, cy: py, r: 11}, layer);
      hover(container, node, tipText(chart, p));
      if (p.job_id) node.addEventListener("click", () => { location.href = `/jobs/${p.job_id}`; });
    }
  }

  function overlaps(a, b) {
    return a.x < b.x + b.w + 2 && b.x < a.x + a.w + 2 && a.y < b.y + b.h && b.y < a.y + a.h;
  }

  // Each label beside its point, or stacked above or below it where another label is already there.
  function labels(svg, chart, s) {
    const layer = make(svg, "g", {class: "labels"});
    const placed = [];
    const order = chart.points.slice()
      .sort((a, b) => (s.x(a.size_mb) - s.x(b.size_mb)) || (s.y(a.value) - s.y(b.value)));
    for (const p of order) {
      const px = s.x(p.size_mb), py = s.y(p.value);
      const text = make(svg, "text", {class: "label", "data-variant": p.variant}, layer);
      text.textContent = p.variant;
      const width = text.getComputedTextLength();
      const right = px + 10 + width <= W - 2;
      let chosen = null;
      for (let k = 0; k < 40 && chosen === null; k++) {
        const shift = (k % 2 ? 1 : -1) * Math.ceil(k / 2) * LINE;  // 0, +1, -1, +2, -2 lines ...
        const box = {x: right ? px + 10 : px - 10 - width, y: py - LINE / 2 + shift, w: width, h: LINE};
        if (box.y < 0 || box.y + box.h > H) continue;
        if (!placed.some((other) => overlaps(box, other))) chosen = {box, shift};
      }
      if (chosen === null) {
        chosen = {box: {x: right ? px + 10 : px - 10 - width, y: py - LINE / 2, w: width, h: LINE}, shift: 0};
      }
      placed.push(chosen.box);
      text.setAttribute("x", chosen.box.x.toFixed(1));
      text.setAttribute("y", (chosen.box.y + LINE - 4).toFixed(1));
      if (chosen.shift !== 0) {
        const edge = right ? chosen.box.x - 2 : chosen.box.x + width + 2;
        make(svg, "line", {class: "leader", x1: px + (right ? 6 : -6), y1: py, x2: edge, y2: chosen.box.y + LINE / 2},
             layer);
      }
    }
  }

  function legend(container, chart, colours) {
    const list = container.querySelector(".legend");
    const item = (draw, text, name) => {
      const li = document.createElement("li");
      if (name) li.dataset.method = name;
      const svg = container.querySelector("svg.plot").cloneNode(false);
      svg.removeAttribute("viewBox"); svg.removeAttribute("role"); svg.removeAttribute("aria-label");
      svg.setAttribute("class", "key");
      draw(svg);
      li.append(svg, document.createTextNode(text));
      list.append(li);
    };
    for (const method of chart.methods) {
      item((svg) => make(svg, "circle", {cx: 11, cy: 7, r: 5, fill: colours[method]}), method, method);
    }
    if (chart.points.some((p) => p.baseline)) {
      item((svg) => make(svg, "path", {d: star(11, 7, 7), fill: "#111"}), "baseline");
    }
    if (chart.points.filter((p) => p.pareto).length > 1) {
      item((svg) => make(svg, "path", {d: "M1,11H11V3H21", fill: "none", stroke: "#ea7a0c", "stroke-width": 2}),
           "Pareto front");
    }
    if (chart.band) {
      item((svg) => make(svg, "rect", {x: 1, y: 2, width: 20, height: 10, fill: "#16a34a", "fill-opacity": 0.25}),
           `within ${chart.max_drop} ${chart.metric_name} of the baseline`);
    }
    if (chart.points.some((p) => p.pick)) {
      item((svg) => make(svg, "circle", {cx: 11, cy: 7, r: 5.5, fill: "none", stroke: "#16a34a", "stroke-width": 2}),
           "smallest within");
    }
  }

  function draw(container) {
    const chart = JSON.parse(container.querySelector(".chart-data").textContent);
    const svg = container.querySelector("svg.plot");
    const colours = {};
    chart.methods.forEach((method, i) => { colours[method] = PALETTE[i % PALETTE.length]; });
    const colour = (p) => (p.baseline ? "#111" : colours[p.method]);
    const s = scales(chart);
    axes(svg, s);
    band(svg, chart, s);
    front(svg, chart, s);
    axisNames(svg, chart, s);
    points(svg, container, chart, s, colour);
    labels(svg, chart, s);
    legend(container, chart, colours);
  }

  document.querySelectorAll(".chart").forEach(draw);
})();
