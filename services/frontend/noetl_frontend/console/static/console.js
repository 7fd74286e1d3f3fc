// The NoETL console's only script (docs/console.md). No framework, no build step, nothing from the internet.
// - live regions: an element with data-live="URL" is replaced by the HTML that the server pushes on that
//   server-sent-events stream (the server renders and escapes it); the browser never polls
// - clicks on a graph step open its detail panel (one fetch per click, refreshed when the page updates)
// - actions (cancel, run again, run a playbook) are JSON POSTs with the X-NoETL-Console header
"use strict";

function post(url, body) {
  return fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-NoETL-Console": "1"},
    body: JSON.stringify(body || {}),
  }).then(async (response) => {
    let data = {};
    try { data = await response.json(); } catch (e) { /* not JSON */ }
    if (!response.ok) {
      const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail || data);
      throw new Error(response.status + ": " + detail);
    }
    return data;
  });
}

function openStep(executionId, name) {
  const panel = document.getElementById("step-panel");
  if (!panel) return;
  panel.dataset.step = name;
  const url = "/executions/" + encodeURIComponent(executionId) + "/step?name=" + encodeURIComponent(name);
  fetch(url, {credentials: "same-origin"}).then((r) => r.text()).then((html) => {
    if (panel.dataset.step !== name) return;     // another step was clicked meanwhile
    panel.innerHTML = html;
    panel.hidden = false;
  });
}

function connect(element) {
  const source = new EventSource(element.dataset.live);
  const target = document.querySelector(element.dataset.liveTarget) || element;
  source.addEventListener(element.dataset.liveEvent, (message) => {
    target.innerHTML = message.data;
    target.dataset.updated = String(Date.now());
    document.body.dataset.liveUpdates = String(Number(document.body.dataset.liveUpdates || 0) + 1);
    const panel = document.getElementById("step-panel");
    if (panel && !panel.hidden && panel.dataset.step) openStep(panel.dataset.execution, panel.dataset.step);
  });
  source.addEventListener("end", () => { source.close(); document.body.dataset.live = "ended"; });
  source.addEventListener("open", () => { document.body.dataset.live = "open"; });
  source.addEventListener("error", () => { document.body.dataset.live = "reconnecting"; });
}

document.addEventListener("click", (event) => {
  const node = event.target.closest("g.node");
  const panel = document.getElementById("step-panel");
  if (node && panel && !event.target.closest("a")) {
    openStep(panel.dataset.execution, node.dataset.step);
    return;
  }
  if (event.target.closest("[data-close]") && panel) {
    panel.hidden = true;
    panel.dataset.step = "";
    return;
  }
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const id = button.dataset.execution;
  const out = document.getElementById("action-result");
  if (button.dataset.action === "cancel") {
    post("/executions/" + encodeURIComponent(id) + "/cancel", {})
      .then(() => { out.textContent = "cancel requested"; })
      .catch((e) => { out.textContent = e.message; });
  } else if (button.dataset.action === "rerun") {
    post("/executions/" + encodeURIComponent(id) + "/rerun", {})
      .then((d) => { window.location.href = "/executions/" + encodeURIComponent(d.execution_id); })
      .catch((e) => { out.textContent = e.message; });
  }
});

document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.id !== "run-form") return;
  event.preventDefault();
  const out = document.getElementById("run-result");
  post("/catalog/run", {path: form.dataset.path, version: Number(form.dataset.version),
                        workload: form.elements.workload.value})
    .then((d) => { window.location.href = "/executions/" + encodeURIComponent(d.execution_id); })
    .catch((e) => { out.textContent = e.message; });
});

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(connect);
});
