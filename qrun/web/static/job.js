// A job's page: its `qrun status --json` row, history and the tail of its log from /api/jobs/N, again every
// two seconds while the job is queued or running.
"use strict";

(function () {
  const id = document.getElementById("job").dataset.job;
  const ACTIVE = ["queued", "running"];

  function facts(list, pairs) {
    list.replaceChildren();
    for (const [name, value] of pairs) {
      if (value === null || value === undefined || value === "") continue;
      list.append(qrun.el("dt", {text: name}), qrun.el("dd", {}, value));
    }
  }

  function show(value) {
    if (value === null || value === undefined) return "";
    if (typeof value === "object") return JSON.stringify(value);
    if (typeof value === "number" && !Number.isInteger(value)) return String(Number(value.toPrecision(6)));
    return String(value);
  }

  function render(view) {
    const job = view.job;
    const status = document.getElementById("job-status");
    status.className = `status-${job.status}`;
    status.textContent = job.status;
    document.title = `Job ${job.id} (${job.status}) · qrun`;
    const upstream = job.depends_on;
    const after = upstream ? qrun.el("a", {href: `/jobs/${upstream}`, text: `job ${upstream}`}) : null;
    facts(document.getElementById("facts"), [
      ["kind", job.kind], ["variant", job.label], ["model", job.model], ["user", job.submitted_by],
      ["sweep", job.sweep_name ? `${job.sweep_name} (${job.sweep})` : job.sweep], ["after", after],
      ["reason", qrun.reason(job)], ["progress", qrun.progress(job)], ["gpu", qrun.gpu(job)],
      ["worker", job.worker], ["priority", show(job.priority)], ["attempts", `${job.attempts} of ${job.max_attempts}`],
      ["submitted", qrun.localTime(job.created_at)], ["started", qrun.localTime(job.started_at)],
      ["finished", qrun.localTime(job.finished_at)], ["elapsed", qrun.elapsed(job.elapsed_s)],
      ["error", job.error ? qrun.firstLine(job.error) : null], ["log", job.log],
    ]);
    facts(document.getElementById("params"), Object.entries(job.params || {}).map(([k, v]) => [k, show(v)]));
    const metrics = Object.entries(job.metrics || {});
    facts(document.getElementById("metrics"), metrics.map(([k, v]) => [k, show(v)]));
    document.getElementById("no-metrics").hidden = metrics.length > 0;
    const artifacts = job.artifacts || [];
    document.querySelector("#artifacts tbody").replaceChildren(...artifacts.map((a) => qrun.el("tr", {},
      qrun.el("td", {text: a.kind}), qrun.el("td", {className: "wrap mono", text: a.path}),
      qrun.el("td", {className: "num", text: a.bytes, title: qrun.bytes(a.bytes)}),
      qrun.el("td", {text: a.node || ""}))));
    document.getElementById("no-artifacts").hidden = artifacts.length > 0;
    document.getElementById("history").textContent = view.history.join("\n");
    const error = document.getElementById("error");
    error.hidden = !view.error.length;
    error.textContent = view.error.join("\n");
    const log = document.getElementById("log");
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = view.log === null ? "" : view.log.join("\n");
    if (atEnd) log.scrollTop = log.scrollHeight;
    log.hidden = view.log === null;
    document.getElementById("log-note").textContent = view.log === null ? "(no log yet)"
      : `(the last ${view.log_tail} lines, progress bars collapsed; qrun logs ${job.id} --raw has it all)`;
  }

  qrun.poll(async () => {
    const view = await qrun.getJSON(`/api/jobs/${id}`);
    render(view);
    return ACTIVE.includes(view.job.status);  // a finished job's page stops asking
  });
})();
