// The organizer page: the fleet and the evaluations, read from the JSON API every
// few seconds. Every value from the API is set with textContent or as an attribute
// of an element made here, never parsed as HTML.
"use strict";

const API = "/api/v1";
const REFRESH_MS = 3000;
// Artifacts linked from the evaluations table, when an evaluation has them.
const LINKED_ARTIFACTS = ["report.html", "coverage.png"];
const FINAL_STATES = new Set(["finished", "failed", "cancelled"]);
// Evaluation id to its EvaluationStatus, kept once the evaluation is final.
const finalStatuses = new Map();

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) {
    node.textContent = String(text);
  }
  if (className) {
    node.className = className;
  }
  return node;
}

function cell(row, text, className) {
  const node = element("td", text, className);
  row.appendChild(node);
  return node;
}

function stateCell(row, state) {
  // The class name is built from a fixed set, so an odd state cannot add classes.
  const known = /^[a-z_]{1,32}$/.test(state) ? "state-" + state : "";
  return cell(row, state, known);
}

async function getJson(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try {
      const body = await response.json();
      message = body.error.message;
    } catch (_) {
      // Keep the status line when the body is not the API's error JSON.
    }
    throw new Error(path + ": " + message);
  }
  return response.json();
}

function gibibytes(bytes) {
  return (bytes / 2 ** 30).toFixed(1);
}

function renderFleet(agents) {
  const body = document.querySelector("#fleet tbody");
  const rows = agents.map((agent) => {
    const row = element("tr");
    row.dataset.agentId = agent.agent_id;
    const capacity = agent.capacity || {
      cpus: agent.cpu_cores, memory_bytes: agent.memory_bytes, slots: agent.slots,
    };
    const free = agent.free || capacity;
    cell(row, agent.site);
    cell(row, agent.agent_id);
    stateCell(row, agent.fleet_state);
    cell(row, agent.approval);
    cell(row, free.cpus + "/" + capacity.cpus, "number");
    cell(row, gibibytes(free.memory_bytes) + "/" + gibibytes(capacity.memory_bytes) + " GiB",
      "number");
    const gpus = Object.entries(agent.gpus_by_model || {})
      .map(([model, count]) => count.free + "/" + count.total + " " + model);
    cell(row, gpus.length ? gpus.join(", ") : "-");
    cell(row, agent.running_jobs.length, "number");
    cell(row, String(agent.last_seen).slice(0, 19).replace("T", " "));
    return row;
  });
  body.replaceChildren(...rows);
  document.getElementById("fleet-empty").hidden = agents.length > 0;
}

function progressCell(row, summary) {
  const node = cell(row);
  const bar = element("progress");
  bar.max = Math.max(summary.shards_total, 1);
  bar.value = summary.shards_done;
  bar.title = summary.shards_done + " of " + summary.shards_total + " shards done";
  node.appendChild(bar);
  if (summary.eta_s !== null && summary.eta_s !== undefined && !FINAL_STATES.has(summary.state)) {
    node.appendChild(element("div", "about " + Math.ceil(summary.eta_s) + " s left"));
  }
}

function scoresCell(row, summary) {
  const node = cell(row, undefined, "scores");
  for (const [name, value] of Object.entries(summary.scores || {})) {
    node.appendChild(element("div", name + " = " + Number(value).toPrecision(6)));
  }
  if (summary.error) {
    node.appendChild(element("div", summary.error, "state-failed"));
  }
}

function artifactsCell(row, summary, status) {
  const node = cell(row, undefined, "artifacts");
  const available = status ? status.artifacts : [];
  for (const name of LINKED_ARTIFACTS) {
    if (!available.includes(name)) {
      continue;
    }
    const link = element("a", name);
    link.href = API + "/evaluations/" + encodeURIComponent(summary.evaluation_id) +
      "/artifacts/" + encodeURIComponent(name);
    link.rel = "noopener";
    node.appendChild(link);
  }
}

// Artifacts are written when an evaluation ends, so only a final evaluation's
// status is fetched, once: a running one may have many shards to send.
async function statusOf(summary) {
  if (!FINAL_STATES.has(summary.state)) {
    return null;
  }
  const cached = finalStatuses.get(summary.evaluation_id);
  if (cached) {
    return cached;
  }
  const status = await getJson(API + "/evaluations/" + encodeURIComponent(summary.evaluation_id));
  finalStatuses.set(summary.evaluation_id, status);
  return status;
}

async function renderEvaluations(summaries) {
  const body = document.querySelector("#evaluations tbody");
  const statuses = await Promise.all(summaries.map(statusOf));
  const rows = summaries.map((summary, index) => {
    const row = element("tr");
    row.dataset.evaluationId = summary.evaluation_id;
    cell(row, summary.evaluation_id);
    cell(row, summary.submission_id);
    stateCell(row, summary.state);
    cell(row,
      summary.shards_done + "/" + summary.shards_total + " done, " +
      summary.shards_running + " running, " + summary.shards_failed + " failed",
      "number shards");
    progressCell(row, summary);
    scoresCell(row, summary);
    artifactsCell(row, summary, statuses[index]);
    return row;
  });
  body.replaceChildren(...rows);
  document.getElementById("evaluations-empty").hidden = summaries.length > 0;
}

// The two tables are fetched and drawn apart, so that one failing endpoint, such as
// the evaluations of a coordinator started without --keys-dir, still shows the other.
async function refresh() {
  const updated = document.getElementById("updated");
  const failures = [];
  try {
    const [agents, evaluations] = await Promise.allSettled([
      getJson(API + "/agents"),
      getJson(API + "/evaluations"),
    ]);
    if (agents.status === "fulfilled") {
      renderFleet(agents.value);
    } else {
      failures.push(agents.reason.message);
    }
    if (evaluations.status === "fulfilled") {
      await renderEvaluations(evaluations.value);
    } else {
      failures.push(evaluations.reason.message);
    }
  } catch (error) {
    failures.push(error.message);
  } finally {
    if (failures.length) {
      updated.className = "error";
      updated.textContent = "refresh failed: " + failures.join("; ");
    } else {
      updated.className = "";
      updated.textContent = "updated " + new Date().toLocaleTimeString();
    }
    window.setTimeout(refresh, REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", refresh);
