// The console's actions: each a POST to the JSON API with the header X-Console-Action (which
// a cross-site form cannot send); the answer is shown where the action was taken.
"use strict";

const base = document.body.dataset.base;

async function act(path, body) {
  const response = await fetch(base + path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Console-Action": "1" },
    body: JSON.stringify(body),
    credentials: "same-origin",
  });
  let answer = {};
  try { answer = await response.json(); } catch (e) { answer = { error: response.statusText }; }
  return { ok: response.ok, answer };
}

function say(element, text, ok) {
  element.textContent = text;
  element.className = "outcome " + (ok ? "ok" : "bad");
}

const actions = document.querySelector(".actions[data-topic]");
if (actions) {
  const where = {
    topic: actions.dataset.topic,
    partition: Number(actions.dataset.partition),
    offset: Number(actions.dataset.offset),
  };
  const outcome = document.getElementById("replay-outcome");
  const go = actions.querySelector("[data-replay=go]");
  actions.querySelector("[data-replay=dry]").addEventListener("click", async () => {
    const { ok, answer } = await act("/api/dead-letters/replay", { ...where, dry_run: true });
    say(outcome, ok ? "Dry run: " + answer.summary : answer.error, ok);
    go.disabled = !ok;
  });
  go.addEventListener("click", async () => {
    if (!confirm("Replay this dead letter to " + "its commands topic?")) return;
    go.disabled = true;
    const { ok, answer } = await act("/api/dead-letters/replay", { ...where, dry_run: false });
    say(outcome, ok ? "Replayed to " + answer.replayed_to + " (replay " + answer.replay_count + "): " + answer.summary : answer.error, ok);
  });
}

for (const row of document.querySelectorAll("tr[data-source]")) {
  const key = { source: row.dataset.source, id: row.dataset.id };
  const toast = document.getElementById("toast");
  const recheck = row.querySelector("[data-recheck]");
  if (recheck) {
    recheck.addEventListener("click", async () => {
      const { ok, answer } = await act("/api/unsettled/recheck", key);
      toast.textContent = ok ? "Looked at again at the next settle." : answer.error;
    });
  }
  const resolve = row.querySelector("[data-resolve]");
  if (resolve) {
    resolve.addEventListener("submit", async (event) => {
      event.preventDefault();
      const form = new FormData(resolve);
      const { ok, answer } = await act("/api/unsettled/resolve", {
        ...key, outcome: form.get("outcome"), note: form.get("note"),
      });
      toast.textContent = ok ? "Resolved: result " + answer.result_id : answer.error;
      if (ok) row.remove();
    });
  }
}
