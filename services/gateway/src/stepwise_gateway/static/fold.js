// The state of a session, folded from its events in the browser.
// It mirrors stepwise_libs/fold.py so that the live view and a replay at any
// event number show what the gateway and the read models see.

export const ACT_STATUSES = new Set([
  "paused", "plan_ready", "stopped", "interrupted",
]);

export function emptyState(sessionId) {
  return {
    sessionId,
    status: "created",
    testCase: "",
    targetUrl: "",
    llmModel: "",
    title: "",
    createdAt: null,
    updatedAt: null,
    lastSeq: 0,
    plans: [],
    steps: [],
    tasks: new Map(),
    currentTaskId: null,
    browserOpen: false,
    blockedStep: null,
    lastRejection: null,
    acts: [],
  };
}

export function fold(sessionId, events, uptoSeq = Infinity) {
  const state = emptyState(sessionId);
  for (const event of events) {
    if (event.seq > uptoSeq) break;
    apply(state, event);
  }
  return state;
}

export function apply(state, event) {
  if (event.seq <= state.lastSeq) return state;
  state.lastSeq = event.seq;
  state.updatedAt = event.at;
  const handler = HANDLERS[event.type];
  if (handler) handler(state, event.data || {}, event);
  return state;
}

// --- derived values --------------------------------------------------------

export function planReady(state) {
  return state.plans.some((plan) => plan.status === "completed") && state.steps.length > 0;
}

export function nextStep(state) {
  const step = state.steps.find((s) => s.status !== "passed" && s.status !== "skipped");
  return step ? step.number : null;
}

export function currentTask(state) {
  return state.currentTaskId ? state.tasks.get(state.currentTaskId) || null : null;
}

export function counts(state) {
  const count = (status) => state.steps.filter((step) => step.status === status).length;
  return { total: state.steps.length, passed: count("passed"), failed: count("failed"), skipped: count("skipped") };
}

function actRunning(state) {
  const task = currentTask(state);
  return Boolean(task && task.taskType === "act_mode" && task.status === "running");
}

function planGenerating(state) {
  const task = currentTask(state);
  return Boolean(task && task.taskType === "plan_generation" && task.status === "running");
}

function workInProgress(state) {
  if (state.browserOpen) return true;
  for (const task of state.tasks.values()) {
    if (task.status === "queued" || task.status === "running") return true;
  }
  return false;
}

// Return which controls fit the state, by the checks the gateway makes before it queues a command.
export function allowedControls(state) {
  const cancelled = state.status === "cancelled";
  const ready = planReady(state);
  const blocked = state.blockedStep !== null && state.status === "paused";
  const acting = actRunning(state);
  const remaining = nextStep(state) !== null;
  const running = state.status === "running";
  return {
    start: !cancelled && ready && state.status === "plan_ready",
    pause: running,
    continue: !cancelled && !blocked && ["paused", "stopped", "interrupted"].includes(state.status) && !acting && remaining,
    run_till_end: !cancelled && ready && !running && !blocked && !acting && remaining,
    act: !cancelled && ready && ACT_STATUSES.has(state.status) && !acting,
    retry_step: blocked && !acting,
    skip_step: blocked && !acting,
    cancel: !cancelled && (["running", "paused", "created", "generating_plan"].includes(state.status) || workInProgress(state)),
    stop: !cancelled && (running || state.status === "paused" || state.browserOpen),
    continue_plan: !cancelled && ready && !planGenerating(state),
  };
}

// --- handlers ----------------------------------------------------------------

function startTask(state, taskId, taskType, event) {
  let task = state.tasks.get(taskId);
  if (!task) {
    task = { taskId, taskType, status: "running", progress: "", error: null, createdAt: event.at, updatedAt: event.at };
    state.tasks.set(taskId, task);
  }
  task.taskType = taskType;
  task.status = "running";
  task.error = null;
  task.updatedAt = event.at;
  state.currentTaskId = taskId;
  return task;
}

function endTask(state, taskId, status, event, error = null) {
  const task = taskId ? state.tasks.get(taskId) : currentTask(state);
  if (!task) return;
  task.status = status;
  task.error = error;
  task.updatedAt = event.at;
}

// The latest execution or run-till-end task that has not ended: a paused run's task is
// still open, and an act that ran meanwhile is a task of its own.
function openRun(state) {
  const tasks = [...state.tasks.values()].reverse();
  return tasks.find((task) => ["execution", "run_till_end"].includes(task.taskType) && task.status === "running") || null;
}

// End the task of a run that ended, and any other run task left open before it.
function endRun(state, taskId, status, event, error = null) {
  endTask(state, taskId, status, event, error);
  for (let run = openRun(state); run !== null; run = openRun(state)) endTask(state, run.taskId, status, event, error);
}

function stepAt(state, number) {
  return number >= 1 && number <= state.steps.length ? state.steps[number - 1] : null;
}

function findPlan(state, planId) {
  return state.plans.find((plan) => plan.planId === planId) || null;
}

function findAct(state, taskId) {
  return state.acts.find((act) => act.taskId === taskId) || null;
}

function newStep(number, description, planId) {
  return {
    number, description, planId, status: "pending", attempts: 0, thinking: "", actions: [], results: [],
    screenshots: [], error: null, errorCategory: null, startedAt: null, finishedAt: null, durationMs: null,
  };
}

function clearRunning(state) {
  for (const step of state.steps) if (step.status === "running") step.status = "pending";
}

const HANDLERS = {
  session_created(state, data, event) {
    state.testCase = data.test_case || "";
    state.targetUrl = data.target_url || "";
    state.llmModel = data.llm_model || "";
    state.title = data.title || "";
    state.createdAt = event.at;
    state.status = "created";
  },
  plan_started(state, data, event) {
    state.plans.push({
      planId: data.plan_id, kind: data.kind || "initial", model: data.model || "", prompt: data.prompt || "",
      status: "generating", planText: "", unparsed: [], error: null, progress: [], createdAt: event.at, completedAt: null,
    });
    startTask(state, data.plan_id, "plan_generation", event);
    if ((data.kind || "initial") === "initial") state.status = "generating_plan";
  },
  plan_progress(state, data, event) {
    const task = state.tasks.get(data.plan_id);
    if (task) {
      task.progress = data.message;
      task.updatedAt = event.at;
    }
    const plan = findPlan(state, data.plan_id);
    if (plan) plan.progress.push(data.message);
  },
  plan_completed(state, data, event) {
    const kind = data.kind || "initial";
    let plan = findPlan(state, data.plan_id);
    if (!plan) {
      plan = { planId: data.plan_id, kind, model: state.llmModel, prompt: "", progress: [], createdAt: event.at };
      state.plans.push(plan);
    }
    plan.status = "completed";
    plan.planText = data.plan_text || "";
    plan.unparsed = [...(data.unparsed || [])];
    plan.completedAt = event.at;
    const offset = state.steps.length;
    for (const step of data.steps || []) state.steps.push(newStep(offset + step.number, step.description, data.plan_id));
    endTask(state, data.plan_id, "completed", event);
    if (kind === "initial") {
      state.status = "plan_ready";
    } else if (["plan_ready", "completed", "failed", "paused", "stopped", "interrupted", "created"].includes(state.status)) {
      const ran = state.steps.some((step) => step.status !== "pending");
      state.status = ran ? "paused" : "plan_ready";
    }
  },
  plan_failed(state, data, event) {
    const plan = findPlan(state, data.plan_id);
    if (plan) {
      plan.status = "failed";
      plan.error = data.error;
    }
    endTask(state, data.plan_id, "failed", event, data.error);
    if (!plan || plan.kind === "initial") state.status = "failed";
  },
  execution_started(state, data, event) {
    startTask(state, data.task_id, data.mode || "execution", event);
    state.status = "running";
    state.browserOpen = true;
    state.blockedStep = null;
  },
  step_started(state, data, event) {
    const step = stepAt(state, data.step_number);
    if (!step) return;
    Object.assign(step, {
      status: "running", attempts: step.attempts + 1, startedAt: event.at, finishedAt: null, error: null,
      errorCategory: null, thinking: "", actions: [], results: [], screenshots: [],
    });
    const task = state.tasks.get(data.task_id);
    if (task) {
      task.progress = `step ${data.step_number} of ${state.steps.length}`;
      task.updatedAt = event.at;
    }
  },
  step_completed(state, data, event) {
    const step = stepAt(state, data.step_number);
    if (!step) return;
    Object.assign(step, {
      status: "passed", thinking: data.thinking || "", actions: [...(data.actions || [])],
      results: [...(data.results || [])], screenshots: [...(data.screenshots || [])], finishedAt: event.at,
      durationMs: data.duration_ms ?? null,
    });
  },
  step_failed(state, data, event) {
    const step = stepAt(state, data.step_number);
    if (!step) return;
    Object.assign(step, {
      status: "failed", error: data.error, errorCategory: data.category || "error", thinking: data.thinking || "",
      actions: [...(data.actions || [])], screenshots: [...(data.screenshots || [])], finishedAt: event.at,
      durationMs: data.duration_ms ?? null,
    });
  },
  step_skipped(state, data, event) {
    const step = stepAt(state, data.step_number);
    if (!step) return;
    step.status = "skipped";
    step.error = data.reason || step.error;
    step.finishedAt = event.at;
    if (state.blockedStep === data.step_number) state.blockedStep = null;
  },
  action_executed(state, data) {
    if (data.step_number === null || data.step_number === undefined) {
      const act = findAct(state, data.task_id);
      if (act && act.status === "running") act.actions.push(data.action);
      return;
    }
    const step = stepAt(state, data.step_number);
    if (step && step.status === "running") step.actions.push(data.action);
  },
  execution_paused(state, data, event) {
    state.status = "paused";
    const task = state.tasks.get(data.task_id);
    if (task) {
      task.progress = `paused after step ${data.after_step}`;
      task.updatedAt = event.at;
    }
  },
  execution_resumed(state, data, event) {
    state.status = "running";
    state.blockedStep = null;
    const task = state.tasks.get(data.task_id);
    if (task) {
      task.status = "running";
      task.updatedAt = event.at;
    } else {
      // Older gateways gave a follow-up sent after an act a task id of its own.
      const run = openRun(state);
      startTask(state, data.task_id, run ? run.taskType : "execution", event);
    }
    state.currentTaskId = data.task_id;
  },
  execution_completed(state, data, event) {
    state.status = data.success ? "completed" : "failed";
    endRun(state, data.task_id, data.success ? "completed" : "failed", event);
  },
  execution_failed(state, data, event) {
    const failed = data.failed_step ? stepAt(state, data.failed_step) : null;
    state.status = failed && failed.errorCategory === "timeout" ? "timed_out" : "failed";
    endRun(state, data.task_id, "failed", event, data.error);
  },
  execution_cancelled(state, data, event) {
    state.status = "cancelled";
    clearRunning(state);
    for (const task of state.tasks.values()) {
      if (task.status === "queued" || task.status === "running") {
        task.status = "cancelled";
        task.updatedAt = event.at;
      }
    }
    for (const act of state.acts) if (act.status === "running") act.status = "cancelled";
  },
  act_mode_started(state, data, event) {
    const task = startTask(state, data.task_id, "act_mode", event);
    task.progress = data.instruction;
    state.browserOpen = true;
    state.acts.push({
      taskId: data.task_id, instruction: data.instruction, status: "running", thinking: "", actions: [],
      result: "", screenshot: null, error: null, startedAt: event.at,
    });
  },
  act_mode_completed(state, data, event) {
    endTask(state, data.task_id, "completed", event);
    const act = findAct(state, data.task_id);
    if (act) {
      Object.assign(act, {
        status: "completed", thinking: data.thinking || "", result: data.result || "", screenshot: data.screenshot || null,
      });
      if (data.actions && data.actions.length) act.actions = [...data.actions];
    }
  },
  act_mode_failed(state, data, event) {
    endTask(state, data.task_id, "failed", event, data.error);
    const act = findAct(state, data.task_id);
    if (act) Object.assign(act, { status: "failed", error: data.error });
  },
  run_till_end_started(state, data, event) {
    startTask(state, data.task_id, "run_till_end", event);
    state.status = "running";
    state.browserOpen = true;
    state.blockedStep = null;
  },
  run_till_end_progress(state, data, event) {
    const task = state.tasks.get(data.task_id);
    if (task) {
      task.progress = `step ${data.current_step} of ${data.total_steps}`;
      task.updatedAt = event.at;
    }
  },
  run_till_end_paused(state, data, event) {
    state.status = "paused";
    state.blockedStep = data.step_number;
    const task = state.tasks.get(data.task_id);
    if (task) {
      task.progress = `paused at failed step ${data.step_number}`;
      task.updatedAt = event.at;
    }
  },
  run_till_end_completed(state, data, event) {
    state.status = data.success ? "completed" : "failed";
    state.blockedStep = null;
    endRun(state, data.task_id, data.success ? "completed" : "failed", event);
  },
  browser_closed(state, data) {
    state.browserOpen = false;
    if (data.reason === "stop_all" && state.status !== "cancelled") state.status = "stopped";
  },
  session_interrupted(state, data, event) {
    state.status = "interrupted";
    state.browserOpen = false;
    clearRunning(state);
    const task = currentTask(state);
    if (task && task.status === "running") {
      task.status = "failed";
      task.error = data.reason;
      task.updatedAt = event.at;
    }
  },
  command_rejected(state, data) {
    state.lastRejection = `${data.command_type}: ${data.reason}`;
  },
};
