// The session page: plan, steps, act results, controls, replay slider and live event log.

import { api, screenshotUrl } from "./api.js";
import { clear, displayTitle, formatDateTime, formatDuration, formatTime, h, statusBadge, statusLabel } from "./dom.js";
import { EventFeed } from "./feed.js";
import { allowedControls, apply, counts, currentTask, emptyState, fold } from "./fold.js";

const QUEUED_HOLD_MS = 15000;

// Each control: its socket command, REST path, button label and what it does.
const CONTROLS = [
  { key: "start", command: "start", path: "start", label: "Start", hint: "Run the plan from step 1" },
  { key: "pause", command: "pause_execution", path: "pause", label: "Pause", hint: "Pause after the current step" },
  { key: "continue", command: "continue", path: "continue", label: "Continue", hint: "Resume from the next step" },
  { key: "run_till_end", command: "run_till_end", path: "run-till-end", label: "Run till end", hint: "Run every remaining step; pause on a failure" },
  { key: "retry_step", command: "retry_step", path: "retry-step", label: "Retry step", hint: "Run the failed step again" },
  { key: "skip_step", command: "skip_step", path: "skip-step", label: "Skip step", hint: "Skip the failed step and go on" },
  { key: "stop", command: "stop_all", path: "stop", label: "Stop", hint: "Pause and close the browser" },
  { key: "cancel", command: "cancel_task", path: "task/cancel", label: "Cancel", hint: "Abort at once and close the browser", danger: true },
];

export function sessionPage(root, sessionId, { viewer }) {
  const live = emptyState(sessionId);
  let replayAt = readReplayParam();
  let pending = null;
  // A queued command keeps its button off until an event caused by it arrives, so a double click
  // cannot queue it twice. The hold ends after QUEUED_HOLD_MS in case no such event comes.
  let queued = null;
  let frame = 0;
  const stepNodes = new Map();
  const stepSignatures = new Map();
  const userOpen = new Map();

  // --- layout -----------------------------------------------------------------
  const connection = h("div", { class: "banner banner-connecting", role: "status", id: "connection", "aria-live": "polite" }, "Connecting…");
  const header = h("section", { class: "session-header", "aria-labelledby": "session-title" });
  const notice = h("div", { id: "command-notice", class: "notice", role: "alert", hidden: true });
  const controlButtons = new Map();
  const controlRow = h(
    "div",
    { class: "control-row", role: "group", "aria-label": "Run controls" },
    CONTROLS.map((control) => {
      const button = h(
        "button",
        {
          type: "button",
          class: control.danger ? "danger" : "",
          title: control.hint,
          dataset: { control: control.key },
          onclick: () => send(control),
        },
        control.label,
      );
      controlButtons.set(control.key, button);
      return button;
    }),
  );
  const actInput = h("input", { id: "act-text", type: "text", placeholder: "Close the cookie banner", autocomplete: "off" });
  const actButton = h("button", { type: "submit" }, "Act");
  const actForm = h(
    "form",
    {
      class: "inline-form",
      onsubmit: (event) => {
        event.preventDefault();
        const task = actInput.value.trim();
        if (!task) return showNotice("error", "Write an instruction for act first.");
        send({ key: "act", command: "act", path: "act", label: "Act" }, { task }).then((ok) => ok && (actInput.value = ""));
      },
    },
    h("label", { for: "act-text" }, "Act in the live browser"),
    h("div", { class: "inline-row" }, actInput, actButton),
  );
  const planInput = h("textarea", { id: "continue-plan-text", rows: 2, placeholder: "Now also check out the cart" });
  const planButton = h("button", { type: "submit" }, "Continue plan");
  const planForm = h(
    "form",
    {
      class: "inline-form",
      onsubmit: (event) => {
        event.preventDefault();
        const prompt = planInput.value.trim();
        if (!prompt) return showNotice("error", "Write what the continuation plan should do first.");
        send({ key: "continue_plan", command: "continue_plan", path: "plan/continue", label: "Continue plan" }, { task_prompt: prompt }).then(
          (ok) => ok && (planInput.value = ""),
        );
      },
    },
    h("label", { for: "continue-plan-text" }, "Continue the plan"),
    h("div", { class: "inline-row" }, planInput, planButton),
  );
  const replayNote = h("p", { class: "replay-note", hidden: true });
  const controls = h(
    "section",
    { class: "card controls", "aria-labelledby": "controls-title" },
    h("h2", { id: "controls-title" }, "Controls"),
    controlRow,
    h("div", { class: "inline-forms" }, actForm, planForm),
    notice,
    replayNote,
  );

  const planStatus = h("div", { class: "plan-status", id: "plan-status", "aria-live": "polite" });
  const stepList = h("ol", { class: "steps", id: "steps", "aria-label": "Plan steps" });
  const unparsed = h("div", { class: "unparsed" });
  const plan = h(
    "section",
    { class: "card", "aria-labelledby": "plan-title" },
    h("h2", { id: "plan-title" }, "Plan"),
    planStatus,
    unparsed,
    stepList,
  );
  const actList = h("ol", { class: "acts", id: "acts", "aria-label": "Act instructions" });
  const acts = h("section", { class: "card", "aria-labelledby": "acts-title", hidden: true }, h("h2", { id: "acts-title" }, "Act instructions"), actList);

  const slider = h("input", { id: "replay-slider", type: "range", min: 0, max: 0, value: 0, step: 1, oninput: () => setReplay(Number(slider.value)) });
  const replayLabel = h("output", { id: "replay-position", for: "replay-slider" });
  const back = h("button", { type: "button", "aria-label": "One event back", onclick: () => setReplay(Math.max(0, viewSeq() - 1)) }, "◀");
  const forward = h("button", { type: "button", "aria-label": "One event forward", onclick: () => setReplay(Math.min(live.lastSeq, viewSeq() + 1)) }, "▶");
  const liveButton = h("button", { type: "button", id: "live-button", onclick: () => setReplay(null) }, "Live");
  const replay = h(
    "section",
    { class: "card replay", "aria-labelledby": "replay-title" },
    h("h2", { id: "replay-title" }, "Replay"),
    h("label", { for: "replay-slider" }, "Show the session as of event"),
    slider,
    h("div", { class: "replay-row" }, back, forward, replayLabel, liveButton),
  );
  const log = h("ol", { class: "event-log", id: "event-log", role: "log", "aria-live": "polite", "aria-label": "Event log" });
  const logCard = h("section", { class: "card log-card", "aria-labelledby": "log-title" }, h("h2", { id: "log-title" }, "Event log"), log);

  clear(
    root,
    connection,
    header,
    h(
      "div",
      { class: "session-grid" },
      h("div", { class: "session-main" }, controls, plan, acts),
      h("aside", { class: "session-side" }, replay, logCard),
    ),
  );

  // --- events -------------------------------------------------------------------
  const feed = new EventFeed(sessionId, {
    onEvents(fresh) {
      // The log follows new events unless the reader has scrolled up.
      const following = log.scrollTop + log.clientHeight >= log.scrollHeight - 24;
      for (const event of fresh) {
        apply(live, event);
        log.append(logItem(event));
        if (queued && event.command_id === queued.commandId) releaseQueued();
      }
      if (following && replayAt === null) log.scrollTop = log.scrollHeight;
      schedule();
    },
    onConnection(state, message) {
      // Render at least once, so that a session with no events gets its controls disabled.
      schedule();
      connection.className = `banner banner-${state}`;
      clear(connection, message);
      if (state === "reconnecting" || state === "closed" || state === "error") {
        connection.append(" ", h("button", { type: "button", class: "link-button", onclick: () => feed.reconnectNow() }, "Reconnect now"));
      }
    },
  });
  window.stepwise = { feed, live };
  feed.start();

  function schedule() {
    if (!frame) frame = requestAnimationFrame(render);
  }

  function viewSeq() {
    return replayAt === null ? live.lastSeq : Math.min(replayAt, live.lastSeq);
  }

  function setReplay(at) {
    replayAt = at;
    const url = new URL(location.href);
    if (replayAt === null) url.searchParams.delete("at");
    else url.searchParams.set("at", String(replayAt));
    history.replaceState(history.state, "", url);
    schedule();
    const item = log.children[viewSeq() - 1];
    if (item) item.scrollIntoView({ block: "nearest" });
  }

  // --- rendering ------------------------------------------------------------------
  function render() {
    frame = 0;
    const replaying = replayAt !== null;
    const state = replaying ? fold(sessionId, feed.events, viewSeq()) : live;
    root.dataset.lastSeq = String(live.lastSeq);
    root.dataset.viewSeq = String(state.lastSeq);
    root.dataset.status = state.status;
    document.title = `${displayTitle(state.title) || "Session"} · ${statusLabel(state.status)} · Stepwise`;
    renderHeader(state, replaying);
    renderControls(replaying);
    renderPlan(state);
    renderActs(state);
    renderReplay(replaying);
    for (const item of log.children) item.classList.toggle("future", Number(item.dataset.seq) > state.lastSeq);
  }

  function renderHeader(state, replaying) {
    const c = counts(state);
    const task = currentTask(state);
    clear(
      header,
      h("p", { class: "crumbs" }, h("a", { href: "/", "data-link": "" }, "← All sessions")),
      h("div", { class: "title-row" }, h("h1", { id: "session-title" }, displayTitle(state.title) || "Session"), statusBadge(state.status, { id: "session-status" })),
      h(
        "dl",
        { class: "facts" },
        fact("Target", state.targetUrl ? h("a", { href: state.targetUrl, target: "_blank", rel: "noopener" }, state.targetUrl) : "…"),
        fact("Model", state.llmModel || "…"),
        fact("Created", formatDateTime(state.createdAt)),
        fact("Steps", `${c.passed} passed · ${c.failed} failed · ${c.skipped} skipped · ${c.total} total`, "session-counts"),
        fact("Task", task ? `${statusLabel(task.taskType)}: ${task.status}${task.progress ? ` (${task.progress})` : ""}` : "none", "task-progress"),
        fact("Browser", state.browserOpen ? "open" : "closed"),
      ),
      replaying ? h("p", { class: "replay-banner", role: "status" }, `Replaying: the view shows event ${state.lastSeq} of ${live.lastSeq}.`) : null,
    );
  }

  function renderControls(replaying) {
    const allowed = allowedControls(live);
    // Before the first event (or for an id the gateway does not know) no control applies.
    const unknown = live.lastSeq === 0;
    const off = (key) => unknown || replaying || pending !== null || (queued !== null && queued.key === key) || !allowed[key];
    for (const [key, button] of controlButtons) button.disabled = off(key);
    actButton.disabled = actInput.disabled = off("act");
    planButton.disabled = planInput.disabled = off("continue_plan");
    replayNote.hidden = !replaying;
    replayNote.textContent = replaying ? "Controls act on the live session; press Live to use them." : "";
    controls.setAttribute("aria-busy", pending ? "true" : "false");
  }

  function renderPlan(state) {
    const latest = state.plans[state.plans.length - 1];
    const messages = [];
    if (!latest) {
      messages.push(h("p", {}, "Waiting for the planner to start…"));
    } else {
      for (const item of state.plans) {
        const name = item.kind === "initial" ? "Plan" : "Continuation plan";
        if (item.status === "generating") {
          messages.push(h("p", { class: "generating" }, h("span", { class: "spinner", "aria-hidden": "true" }), `${name} is being generated by ${item.model}…`));
          for (const line of item.progress) messages.push(h("p", { class: "progress-line" }, line));
        } else if (item.status === "failed") {
          messages.push(h("p", { class: "error" }, `${name} failed: ${item.error}`));
        }
      }
    }
    clear(planStatus, messages);
    clear(
      unparsed,
      state.plans
        .filter((item) => item.unparsed && item.unparsed.length)
        .map((item) => h("div", { class: "warning" }, h("strong", {}, "Not understood: "), h("ul", {}, item.unparsed.map((part) => h("li", {}, part))))),
    );

    const seen = new Set();
    const latestTouched = state.steps.reduce((found, item) => (item.status !== "pending" ? item.number : found), 0);
    for (const step of state.steps) {
      seen.add(step.number);
      const blocked = state.blockedStep === step.number;
      const open = userOpen.has(step.number)
        ? userOpen.get(step.number)
        : step.status === "running" || step.status === "failed" || blocked || step.number === latestTouched;
      const signature = `${JSON.stringify(step)}|${blocked}|${open}`;
      let node = stepNodes.get(step.number);
      if (!node) {
        node = h("li", { class: "step", dataset: { step: String(step.number) } });
        stepNodes.set(step.number, node);
      }
      if (stepSignatures.get(step.number) !== signature) {
        renderStep(node, step, blocked, open);
        stepSignatures.set(step.number, signature);
      }
      if (node.parentNode !== stepList || stepList.children[step.number - 1] !== node) {
        stepList.insertBefore(node, stepList.children[step.number - 1] || null);
      }
    }
    for (const [number, node] of stepNodes) {
      if (!seen.has(number)) {
        node.remove();
        stepNodes.delete(number);
        stepSignatures.delete(number);
      }
    }
  }

  function renderStep(node, step, blocked, open) {
    node.className = `step step-${step.status}${blocked ? " step-blocked" : ""}`;
    node.dataset.status = step.status;
    const meta = [step.attempts > 1 ? `attempt ${step.attempts}` : "", formatDuration(step.durationMs)].filter(Boolean).join(" · ");
    const body = [];
    if (step.error) body.push(h("p", { class: "step-error" }, step.errorCategory && step.errorCategory !== "error" ? `${step.errorCategory}: ${step.error}` : step.error));
    if (blocked) body.push(h("p", { class: "warning" }, "Run till end is paused here: fix the page with Act, then Retry step or Skip step."));
    if (step.thinking) body.push(h("div", { class: "thinking" }, h("span", { class: "label" }, "Thinking"), h("p", {}, step.thinking)));
    if (step.actions.length) body.push(h("div", { class: "actions" }, h("span", { class: "label" }, "Actions"), actionList(step.actions)));
    if (step.results.length) body.push(h("div", { class: "results" }, h("span", { class: "label" }, "Results"), h("ul", {}, step.results.map((r) => h("li", {}, r)))));
    const shots = step.screenshots.length
      ? h("div", { class: "shots" }, step.screenshots.map((name, i) => thumbnail(name, `Screenshot ${i + 1} of step ${step.number}`)))
      : null;
    const head = [
      h("span", { class: "step-number" }, h("span", { class: "visually-hidden" }, "Step "), step.number),
      h("span", { class: "step-text" }, step.description),
      meta ? h("span", { class: "step-meta" }, meta) : null,
      statusBadge(step.status, { class: `badge status-${step.status} step-status` }),
    ];
    if (!body.length && !shots) {
      clear(node, h("div", { class: "step-head" }, head));
      return;
    }
    const summary = h("summary", { class: "step-head" }, head);
    const details = h("details", { open }, summary, h("div", { class: "step-body" }, h("div", { class: "step-detail" }, body), shots));
    // Only a user's own click decides later whether this step stays open.
    summary.addEventListener("click", () => userOpen.set(step.number, !details.open));
    details.addEventListener("toggle", () => stepSignatures.set(step.number, `${JSON.stringify(step)}|${blocked}|${details.open}`));
    clear(node, details);
  }

  function actionList(actions) {
    return h(
      "ol",
      { class: "action-list" },
      actions.map((action) => {
        const params = action.params && Object.keys(action.params).length ? JSON.stringify(action.params) : "";
        const outcome = action.error ? h("span", { class: "action-error" }, `✗ ${action.error}`) : action.result ? h("span", { class: "action-result" }, `→ ${action.result}`) : null;
        return h("li", { class: action.success === false || action.error ? "action failed" : "action" }, h("code", {}, action.name), params ? h("code", { class: "params" }, params) : null, outcome);
      }),
    );
  }

  function thumbnail(name, label) {
    const url = screenshotUrl(sessionId, name);
    return h(
      "button",
      { type: "button", class: "thumb", "aria-label": `Enlarge ${label}`, onclick: () => viewer.open(url, label) },
      h("img", { src: url, alt: label, loading: "lazy", width: 220, height: 138 }),
    );
  }

  function renderActs(state) {
    acts.hidden = state.acts.length === 0;
    clear(
      actList,
      state.acts.map((act) =>
        h(
          "li",
          { class: `act act-${act.status}`, dataset: { status: act.status } },
          h("div", { class: "step-head" }, h("span", { class: "step-text" }, act.instruction), statusBadge(act.status)),
          act.thinking ? h("div", { class: "thinking" }, h("span", { class: "label" }, "Thinking"), h("p", {}, act.thinking)) : null,
          act.actions.length ? h("div", { class: "actions" }, h("span", { class: "label" }, "Actions"), actionList(act.actions)) : null,
          act.result ? h("p", { class: "act-result" }, act.result) : null,
          act.error ? h("p", { class: "step-error" }, act.error) : null,
          act.screenshot ? h("div", { class: "shots" }, thumbnail(act.screenshot, `Screenshot of act: ${act.instruction}`)) : null,
        ),
      ),
    );
  }

  function renderReplay(replaying) {
    slider.max = String(live.lastSeq);
    slider.value = String(viewSeq());
    slider.setAttribute("aria-valuetext", `event ${viewSeq()} of ${live.lastSeq}`);
    replayLabel.textContent = replaying ? `event ${viewSeq()} of ${live.lastSeq}` : `live · ${live.lastSeq} events`;
    liveButton.disabled = !replaying;
    liveButton.setAttribute("aria-pressed", replaying ? "false" : "true");
    back.disabled = viewSeq() <= 0;
    forward.disabled = !replaying || viewSeq() >= live.lastSeq;
  }

  function logItem(event) {
    return h(
      "li",
      { dataset: { seq: String(event.seq), type: event.type }, class: `log-${event.type}` },
      h("a", { class: "seq", href: `?at=${event.seq}`, "aria-label": `Replay to event ${event.seq}`, onclick: (e) => (e.preventDefault(), setReplay(event.seq)) }, `#${event.seq}`),
      h("time", { datetime: event.at }, formatTime(event.at)),
      h("span", { class: "type" }, event.type),
      h("span", { class: "summary" }, summarize(event)),
    );
  }

  // --- commands -------------------------------------------------------------------
  async function send(control, fields = {}) {
    pending = control.key;
    schedule();
    try {
      const reply = await feed.command(control.command, fields);
      if (reply === null) {
        // No socket: the REST form of the same control.
        try {
          const answer = await api.control(sessionId, control.path, fields);
          holdQueued(control.key, answer.command_id);
          showNotice("ok", `${control.label} queued (task ${answer.task_id.slice(0, 8)}).`);
          return true;
        } catch (error) {
          const verb = error.status === 409 ? "rejected" : "failed";
          showNotice("error", `${control.label} ${verb}: ${error.message}`);
          return false;
        }
      }
      if (reply.type === "command_rejected") {
        showNotice("error", `${control.label} rejected: ${reply.reason}`);
        return false;
      }
      if (reply.type === "error") {
        showNotice("error", `${control.label} failed: ${reply.message}`);
        return false;
      }
      holdQueued(control.key, reply.command_id);
      showNotice("ok", `${control.label} queued${reply.task_id ? ` (task ${reply.task_id.slice(0, 8)})` : ""}.`);
      return true;
    } catch (error) {
      showNotice("error", `${control.label} failed: ${error.message}`);
      return false;
    } finally {
      pending = null;
      schedule();
    }
  }

  function holdQueued(key, commandId) {
    if (!commandId || feed.events.some((event) => event.command_id === commandId)) return;
    releaseQueued();
    queued = { key, commandId, timer: setTimeout(releaseQueued, QUEUED_HOLD_MS) };
  }

  function releaseQueued() {
    if (!queued) return;
    clearTimeout(queued.timer);
    queued = null;
    schedule();
  }

  function showNotice(kind, text) {
    notice.hidden = false;
    notice.className = `notice notice-${kind}`;
    notice.dataset.kind = kind;
    notice.textContent = text;
  }

  return () => {
    releaseQueued();
    feed.close();
    if (frame) cancelAnimationFrame(frame);
    if (window.stepwise && window.stepwise.feed === feed) delete window.stepwise;
  };
}

function fact(term, value, id = null) {
  return h("div", {}, h("dt", {}, term), h("dd", { id }, value));
}

function readReplayParam() {
  const raw = new URLSearchParams(location.search).get("at");
  if (raw === null || !/^\d+$/.test(raw)) return null;
  return Number(raw);
}

// One line per event for the log.
export function summarize(event) {
  const d = event.data || {};
  switch (event.type) {
    case "session_created":
      return `${d.target_url} with ${d.llm_model}`;
    case "plan_started":
      return `${d.kind === "continuation" ? "continuation plan" : "plan"} by ${d.model}`;
    case "plan_progress":
      return d.message;
    case "plan_completed":
      return `${(d.steps || []).length} steps${d.unparsed && d.unparsed.length ? `, ${d.unparsed.length} not understood` : ""}`;
    case "plan_failed":
    case "execution_failed":
    case "act_mode_failed":
      return d.error;
    case "execution_started":
    case "run_till_end_started":
      return `from step ${d.from_step} of ${d.total_steps}`;
    case "step_started":
      return `step ${d.step_number}: ${d.description}`;
    case "action_executed": {
      const a = d.action || {};
      const where = d.step_number ? `step ${d.step_number}: ` : "";
      return `${where}${a.name}${a.error ? ` ✗ ${a.error}` : a.result ? ` → ${a.result}` : ""}`;
    }
    case "step_completed":
      return `step ${d.step_number} passed`;
    case "step_failed":
      return `step ${d.step_number} failed: ${d.error}`;
    case "step_skipped":
      return `step ${d.step_number} skipped${d.reason ? `: ${d.reason}` : ""}`;
    case "execution_paused":
      return `after step ${d.after_step}`;
    case "execution_resumed":
      return `from step ${d.from_step}`;
    case "execution_completed":
      return `${d.passed} passed, ${d.failed} failed, ${d.skipped} skipped of ${d.total}`;
    case "execution_cancelled":
      return d.reason;
    case "act_mode_started":
      return d.instruction;
    case "act_mode_completed":
      return d.result;
    case "run_till_end_progress":
      return `step ${d.current_step} of ${d.total_steps}`;
    case "run_till_end_paused":
      return `at step ${d.step_number}: ${d.error}`;
    case "run_till_end_completed":
      return d.success ? "success" : "with failures";
    case "browser_closed":
      return d.reason;
    case "session_interrupted":
      return d.reason;
    case "command_rejected":
      return `${d.command_type}: ${d.reason}`;
    default:
      return "";
  }
}
