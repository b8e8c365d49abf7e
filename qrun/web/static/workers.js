// The workers page: `qrun workers --json` rows from /api/workers, by node, again every two seconds.
"use strict";

(function () {
  const body = document.querySelector("#workers tbody");
  const all = document.getElementById("f-all");

  function slot(row, rows) {
    const twins = rows.filter((r) => r.slot === row.slot && r.node === row.node).length;
    return twins === 1 ? row.slot : `${row.slot} (pid ${String(row.name).split(":")[1]})`;
  }

  function cells(row, rows) {
    const job = row.current_job ? qrun.el("a", {href: `/jobs/${row.current_job}`, text: `job ${row.current_job}`}) : "";
    const state = row.state.startsWith("running") ? "running" : row.state;
    return [
      qrun.el("td", {text: row.node}),
      qrun.el("td", {text: slot(row, rows), title: row.name}),
      qrun.el("td", {text: row.gpu ? `gpu ${row.gpu}` : row.device}),
      qrun.el("td", {className: `state status-${state}`, text: row.state}),
      qrun.el("td", {}, job),
      qrun.el("td", {text: qrun.ago(row.last_seen_s), title: row.heartbeat_at}),
      qrun.el("td", {className: "num", text: row.jobs_done}),
      qrun.el("td", {text: qrun.localTime(row.started_at), title: row.started_at}),
    ];
  }

  async function load() {
    const rows = await qrun.getJSON("/api/workers" + (all.checked ? "?all=1" : ""));
    rows.sort((a, b) => (a.node + a.slot).localeCompare(b.node + b.slot));
    body.replaceChildren(...rows.map((row) => qrun.el("tr", {"data-worker": row.name}, ...cells(row, rows))));
    const nodes = new Set(rows.map((r) => r.node));
    const busy = rows.filter((r) => r.current_job).length;
    const live = rows.filter((r) => r.state !== "stopped" && r.state !== "lost").length;
    document.getElementById("summary").textContent =
      `${rows.length} worker${rows.length === 1 ? "" : "s"} on ${nodes.size} node${nodes.size === 1 ? "" : "s"}` +
      ` · ${live} reporting · ${busy} running a job`;
    document.getElementById("empty").hidden = rows.length > 0;
  }

  const poller = qrun.poll(load);
  all.addEventListener("change", () => poller.now());
})();
