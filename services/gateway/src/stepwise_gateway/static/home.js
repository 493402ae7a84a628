// The home page: the new-session form and the session list, refreshed every few seconds.

import { api } from "./api.js";
import { clear, displayTitle, formatDateTime, h, statusBadge } from "./dom.js";

const REFRESH_MS = 3000;
const LIST_LIMIT = 50;

export function homePage(root, { navigate }) {
  let timer = null;
  let closed = false;

  // --- new-session form ---------------------------------------------------------
  const testCase = h("textarea", {
    id: "test-case", name: "test_case", rows: 9, required: true, spellcheck: false,
    placeholder: '1. Open the login page\n2. Type "standard_user" into "Username"\n3. Click "Login"\n4. Check that the page shows "Products"',
    "aria-describedby": "test-case-help",
  });
  const targetUrl = h("input", { id: "target-url", name: "target_url", type: "url", required: true, placeholder: "https://example.com/login", autocomplete: "url" });
  const model = h("select", { id: "llm-model", name: "llm_model" }, h("option", { value: "offline" }, "offline"));
  const modelHelp = h("p", { class: "help", id: "model-help" }, "The offline model follows numbered steps written in the phrases below.");
  const formError = h("p", { class: "form-error", role: "alert", id: "form-error", hidden: true });
  const submit = h("button", { type: "submit", class: "primary" }, "Create session");
  const form = h(
    "form",
    { id: "new-session", class: "card", "aria-labelledby": "new-title", novalidate: true, onsubmit: create },
    h("h2", { id: "new-title" }, "New session"),
    h("label", { for: "test-case" }, "Test case"),
    testCase,
    h(
      "p",
      { class: "help", id: "test-case-help" },
      "One step per line. Phrases: open / go to URL, click \"X\", type \"V\" into \"F\", press KEY, select \"O\" in \"F\", check that the page shows \"T\", wait for \"T\".",
    ),
    h("label", { for: "target-url" }, "Target URL"),
    targetUrl,
    h("label", { for: "llm-model" }, "Model"),
    model,
    modelHelp,
    formError,
    submit,
  );

  api.config().then(
    (config) => {
      clear(model, config.models.map((name) => h("option", { value: name, selected: name === config.default_model }, name)));
      if (config.gemini_configured) modelHelp.textContent = "Gemini models need the API key the gateway was started with; offline needs none.";
    },
    () => {},
  );

  async function create(event) {
    event.preventDefault();
    for (const field of [testCase, targetUrl]) field.removeAttribute("aria-invalid");
    formError.hidden = true;
    if (!testCase.value.trim()) return fail("Write the test case first: one step per line.", testCase);
    if (!targetUrl.value.trim()) return fail("Give the target URL, like https://example.com/login.", targetUrl);
    submit.disabled = true;
    submit.textContent = "Creating…";
    try {
      const created = await api.createSession({ test_case: testCase.value, target_url: targetUrl.value.trim(), llm_model: model.value });
      navigate(`/sessions/${created.session_id}`);
    } catch (error) {
      const field = { test_case: testCase, target_url: targetUrl }[error.field] || null;
      fail(error.message, field);
    } finally {
      submit.disabled = false;
      submit.textContent = "Create session";
    }
  }

  function fail(message, field) {
    formError.hidden = false;
    formError.textContent = message;
    if (field) {
      field.setAttribute("aria-invalid", "true");
      field.focus();
    }
  }

  // --- session list ---------------------------------------------------------------
  const listStatus = h("p", { class: "list-status", role: "status", id: "list-status" }, "Loading sessions…");
  const rows = h("tbody", { id: "session-rows" });
  const table = h(
    "table",
    { class: "sessions", "aria-describedby": "list-status" },
    h("caption", { class: "visually-hidden" }, "Sessions, newest first"),
    h("thead", {}, h("tr", {}, ["Session", "Status", "Target", "Created", "Passed", "Failed", "Steps"].map((name) => h("th", { scope: "col" }, name)))),
    rows,
  );
  const list = h("section", { class: "card list-card", "aria-labelledby": "list-title" }, h("h2", { id: "list-title" }, "Sessions"), listStatus, h("div", { class: "table-wrap" }, table));

  clear(root, h("div", { class: "home-grid" }, form, list));

  async function refresh() {
    timer = null;
    if (closed) return;
    if (document.hidden) {
      timer = setTimeout(refresh, REFRESH_MS);
      return;
    }
    try {
      const page = await api.listSessions(LIST_LIMIT);
      renderRows(page.sessions);
      const count = page.sessions.length;
      const updated = new Date().toLocaleTimeString([], { hour12: false });
      listStatus.textContent = count
        ? `${count === 1 ? "1 session" : `The ${count} most recent sessions`}, updated ${updated}`
        : "No sessions yet: create one with the form.";
      listStatus.classList.remove("error");
    } catch (error) {
      listStatus.textContent = `Could not load the sessions: ${error.message}`;
      listStatus.classList.add("error");
    }
    if (!closed) timer = setTimeout(refresh, REFRESH_MS);
  }

  function renderRows(sessions) {
    clear(
      rows,
      sessions.map((session) =>
        h(
          "tr",
          { dataset: { sessionId: session.session_id, status: session.status } },
          h("td", {}, h("a", { href: `/sessions/${session.session_id}`, "data-link": "" }, displayTitle(session.title) || session.session_id.slice(0, 8))),
          h("td", {}, statusBadge(session.status)),
          h("td", { class: "url" }, session.target_url),
          h("td", {}, h("time", { datetime: session.created_at || "" }, formatDateTime(session.created_at))),
          h("td", { class: "num passed-count" }, session.counts.passed),
          h("td", { class: session.counts.failed ? "num failed-count failed" : "num failed-count" }, session.counts.failed),
          h("td", { class: "num" }, session.counts.steps_total),
        ),
      ),
    );
  }

  refresh();
  document.title = "Stepwise";
  return () => {
    closed = true;
    clearTimeout(timer);
  };
}
