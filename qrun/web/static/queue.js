// The queue page: `qrun status --json` rows from /api/status (with the page's filters as its options),
// drawn as `qrun status` draws them, again every two seconds.
"use strict";

(function () {
  const form = document.getElementById("filters");
  const body = document.querySelector("#queue tbody");
  const fields = {user: "f-user", sweep: "f-sweep", state: "f-state"};

  function fromAddress() {
    const given = new URLSearchParams(location.search);
    for (const [name, id] of Object.entries(fields)) {
      const select = document.getElementById(id), value = given.get(name) || "";
      if (value && ![...select.options].some((o) => o.value === value)) {
        select.append(qrun.el("option", {value, text: value}));  // a value the list does not offer
      }
      select.value = value;
    }
    document.getElementById("f-all").checked = ["1", "true", "yes", "on"].includes(given.get("all") || "");
  }

  function query() {
    const params = new URLSearchParams();
    for (const [name, id] of Object.entries(fields)) {
      const value = document.getElementById(id).value;
      if (value) params.set(name, value);
    }
    if (document.getElementById("f-all").checked) params.set("all", "1");
    return params.toString();
  }

  function cells(row) {
    const status = qrun.el("td", {className: `status status-${row.status}`, text: row.status});
    return [
      qrun.el("td", {className: "num"}, qrun.el("a", {href: `/jobs/${row.id}`, text: row.id})),
      qrun.el("td", {text: row.submitted_by || ""}),
      qrun.el("td", {text: row.model_name || "", title: row.model || ""}),
      qrun.el("td", {text: row.kind}),
      qrun.el("td", {className: "params", text: row.label || ""}),
      status,
      qrun.el("td", {className: "reason", text: qrun.reason(row)}),
      qrun.el("td", {className: "progress", text: qrun.progress(row)}),
      qrun.el("td", {text: qrun.gpu(row)}),
      qrun.el("td", {className: "num", text: qrun.elapsed(row.elapsed_s)}),
      qrun.el("td", {text: row.sweep_name || row.sweep || "", title: row.sweep || ""}),
      qrun.el("td", {className: "num", text: row.priority}),
      qrun.el("td", {text: qrun.localTime(row.created_at), title: row.created_at || ""}),
      qrun.el("td", {className: "error", text: qrun.firstLine(row.error), title: row.error || ""}),
    ];
  }

  function summary(rows) {
    const counts = {};
    rows.forEach((row) => { counts[row.status] = (counts[row.status] || 0) + 1; });
    const node = document.getElementById("summary");
    node.replaceChildren(`${rows.length} job${rows.length === 1 ? "" : "s"}`);
    for (const [state, n] of Object.entries(counts)) {
      node.append(" · ", qrun.el("b", {className: `status-${state}`, text: n}), ` ${state}`);
    }
  }

  async function load() {
    const rows = await qrun.getJSON("/api/status?" + query());
    body.replaceChildren(...rows.map((row) => qrun.el("tr", {"data-job": row.id, "data-status": row.status},
                                                       ...cells(row))));
    summary(rows);
    const empty = document.getElementById("empty");
    empty.hidden = rows.length > 0;
    empty.textContent = document.getElementById("f-all").checked ? "No job matches."
      : "No active jobs, and none finished in the last hour that match: tick “whole history” for older ones.";
  }

  fromAddress();
  const poller = qrun.poll(load);
  form.addEventListener("change", () => {
    const q = query();
    history.replaceState(null, "", q ? `/?${q}` : "/");
    poller.now();
  });
  form.addEventListener("submit", (event) => event.preventDefault());
})();
