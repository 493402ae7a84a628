"""A deterministic chat model for browser-use that turns one plan step into browser actions.

It implements browser-use 0.13.14's `BaseChatModel` protocol: the agent calls
`ainvoke(messages, output_format=AgentOutput)` once per agent step, and the
model returns `ChatInvokeCompletion(completion=AgentOutput(...))`. The step text
is the agent's task (inside `<user_request>`), the page is the serialized
`<browser_state>` of the last user message that has one, and the result of the
previous agent step is the last `<step>` block of `<agent_history>`.

One instance serves one agent run (one plan step): it remembers what it did, so
after its action it returns `done`. No network, no randomness.

A `{{name}}` placeholder in the text a step types or selects becomes
`<secret>name</secret>` in the action, and browser-use puts the secret's value
there just before the action runs, so the model never receives the value.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, TypeVar, overload
from urllib.parse import urljoin

from browser_use.llm.base import BaseChatModel
from browser_use.llm.messages import BaseMessage
from browser_use.llm.views import ChatInvokeCompletion
from pydantic import BaseModel
from stepwise_libs.phrases import StepIntent, parse_step
from stepwise_libs.secrets import placeholders, to_secret_tags

from .page_state import PageElement, PageState, extract_browser_state, parse_page_state

T = TypeVar("T", bound=BaseModel)

OFFLINE_MODEL_NAME = "offline"

# Checks re-read the page this many times (about one second apart) before failing,
# so text that appears just after a navigation is still found.
CHECK_POLLS = 3
DEFAULT_WAIT_SECONDS = 10.0

_USER_REQUEST = re.compile(r"<user_request>\s*(?P<task>.*?)\s*</user_request>", re.S)
_HISTORY = re.compile(r"<agent_history>(?P<history>.*?)</agent_history>", re.S)
# browser-use reports some failed actions in the step result without setting ActionResult.error,
# for example "Element index 999 not available - page may have changed". Matching the start of
# the result keeps typed text such as "Typed 'error'" from counting as a failure.
_FAILED_RESULT = re.compile(
    r"^(?:element index \d+ not available|error\b|failed\b|could not\b|cannot\b|unable to\b)", re.I
)

_KEY_NAMES = {
    "enter": "Enter",
    "return": "Enter",
    "tab": "Tab",
    "escape": "Escape",
    "esc": "Escape",
    "space": "Space",
    "backspace": "Backspace",
    "delete": "Delete",
    "arrowdown": "ArrowDown",
    "arrowup": "ArrowUp",
    "down": "ArrowDown",
    "up": "ArrowUp",
    "pagedown": "PageDown",
    "pageup": "PageUp",
}


class OfflineModelError(ValueError):
    """The agent sent messages the offline model cannot read."""


@dataclass
class _Decision:
    thinking: str
    actions: list[dict[str, dict[str, Any]]]
    next_goal: str


def message_text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    return "\n".join(
        getattr(part, "text", "") for part in content if getattr(part, "type", "") == "text"
    )


def resolve_url(target: str, base_url: str) -> str:
    """Resolve a step's URL against the session's target URL; an empty target is the target URL."""
    if not target:
        return base_url
    if re.match(r"^[a-z][a-z0-9+.-]*://", target, re.I):
        return target
    if target.startswith("/") or not base_url:
        return urljoin(base_url, target) if base_url else target
    if _looks_like_host(target.split("/", 1)[0]):
        return f"https://{target}"
    return urljoin(base_url, target)


_FILE_EXTENSIONS = frozenset(
    {"html", "htm", "php", "asp", "aspx", "jsp", "cgi", "txt", "json", "xml", "pdf"}
)


def _looks_like_host(segment: str) -> bool:
    """Tell `example.org` (a host) from `cart.html` (a page relative to the target URL)."""
    if segment.startswith(".") or "." not in segment:
        return False
    suffix = segment.rsplit(".", 1)[1].split(":", 1)[0].lower()
    return suffix.isalpha() and suffix not in _FILE_EXTENSIONS


def _fold(value: str) -> str:
    return " ".join(value.split()).casefold()


def _element_names(element: PageElement, page: PageState) -> list[str]:
    """The names an element can be referred to by: text, accessible attributes and label text."""
    names = [element.text, *element.texts]
    for key in (
        "aria-label",
        "title",
        "placeholder",
        "value",
        "alt",
        "name",
        "id",
        "aria-placeholder",
    ):
        value = element.attributes.get(key)
        if value:
            names.append(value)
    names.extend(_label_texts(element, page))
    return [name for name in names if name]


def _label_texts(element: PageElement, page: PageState) -> list[str]:
    """Text lines standing next to a form control: a label before a field or after a checkbox."""
    if not (element.is_text_field or element.is_toggle or element.tag == "select"):
        return []
    labels: list[str] = []
    position = element.line
    if position > 0:
        before = page.lines[position - 1]
        labels.append(before.text if before.element is None else before.element.text)
    if element.is_toggle and position + 1 < len(page.lines):
        after = page.lines[position + 1]
        if after.element is None:
            labels.append(after.text)
    return labels


def find_element(page: PageState, target: str, kinds: str = "any") -> PageElement | None:
    """Find the element a step names: exact match first, then case-insensitive, then containment."""
    candidates = [element for element in page.elements if _kind_matches(element, kinds)]
    wanted = _fold(target)
    tests = (
        lambda name: name == target,
        lambda name: _fold(name) == wanted,
        lambda name: wanted in _fold(name),
    )
    for test in tests:
        matches = [
            element
            for element in candidates
            if any(test(name) for name in _element_names(element, page))
        ]
        if matches:
            # A wrapper's text includes its children's, so the most deeply nested match is the
            # control itself (a link inside a clickable <span>); ties go to document order.
            deepest = max(element.depth for element in matches)
            return next(element for element in matches if element.depth == deepest)
    return None


def _kind_matches(element: PageElement, kinds: str) -> bool:
    if kinds == "field":
        return element.is_text_field
    if kinds == "select":
        return element.tag == "select"
    return True


# Curly quotes count as straight ones, so a step typed with "..." finds text shown with “...”.
_STRAIGHT_QUOTES = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"'}
)


def normalize_text(value: str) -> str:
    """Collapse whitespace runs to one space and replace typographic quotes with straight ones."""
    return " ".join(value.split()).translate(_STRAIGHT_QUOTES)


def text_on_page(page: PageState, text: str) -> bool:
    """Tell whether `text` is a case-sensitive substring of the page's visible text.

    Case counts, as in Playwright's `toContainText` without `ignoreCase`, so a check for
    "Products" fails on a login page that only shows "see the products".
    """
    return normalize_text(text) in normalize_text(page.visible_text)


class OfflineChatModel(BaseChatModel):
    """Maps a step phrase onto browser-use actions; create one per plan step."""

    model: str = OFFLINE_MODEL_NAME
    _verified_api_keys = True

    def __init__(self, target_url: str = "") -> None:
        self.model = OFFLINE_MODEL_NAME
        self.target_url = target_url
        self.calls = 0
        self._acted = False
        self._polls = 0
        self._wait_started: float | None = None

    @property
    def provider(self) -> str:
        return "stepwise"

    @property
    def name(self) -> str:
        return OFFLINE_MODEL_NAME

    @property
    def model_name(self) -> str:
        return OFFLINE_MODEL_NAME

    @overload
    async def ainvoke(
        self, messages: list[BaseMessage], output_format: None = None, **kwargs: Any
    ) -> ChatInvokeCompletion[str]: ...

    @overload
    async def ainvoke(
        self, messages: list[BaseMessage], output_format: type[T], **kwargs: Any
    ) -> ChatInvokeCompletion[T]: ...

    async def ainvoke(
        self, messages: list[BaseMessage], output_format: type[T] | None = None, **kwargs: Any
    ) -> ChatInvokeCompletion[T] | ChatInvokeCompletion[str]:
        self.calls += 1
        decision = self.decide(messages)
        output = {
            "thinking": decision.thinking,
            "evaluation_previous_goal": "",
            "memory": "",
            "next_goal": decision.next_goal,
            "action": decision.actions,
        }
        if output_format is None:
            return ChatInvokeCompletion(completion=json.dumps(output), usage=None)
        return ChatInvokeCompletion(completion=output_format.model_validate(output), usage=None)

    def decide(self, messages: list[BaseMessage]) -> _Decision:
        """Choose the next actions from the task, the page state and the previous result."""
        texts = [message_text(message) for message in messages]
        # The system prompt also names <user_request>; the step text is in a user message.
        user_texts = [message_text(message) for message in messages if message.role == "user"]
        task = next(
            (m.group("task") for text in reversed(user_texts) if (m := _USER_REQUEST.search(text))),
            None,
        )
        state_text = next(
            (s for text in reversed(texts) if (s := extract_browser_state(text)) is not None), None
        )
        if task is None:
            raise OfflineModelError(
                "the agent's messages contain no <user_request> with the step text"
            )
        if state_text is None:
            raise OfflineModelError("the agent's messages contain no <browser_state> with the page")
        page = parse_page_state(state_text)
        step = task.strip()
        if self._acted:
            return self._after_action(step, texts)
        intent = parse_step(step)
        if intent is None:
            return _done(
                f'The step "{step}" matches none of the phrases the offline model understands '
                "(open, click, type, press, select, check, wait)",
                success=False,
                thinking=f'I cannot map "{step}" to a browser action.',
            )
        return self._act(intent, step, page)

    def _after_action(self, step: str, texts: list[str]) -> _Decision:
        result = _last_step_result(texts)
        if result and _FAILED_RESULT.search(result):
            return _done(
                result, success=False, thinking=f"The action for this step failed: {result}"
            )
        summary = result or "done"
        return _done(
            f'Step "{step}" done: {summary}',
            success=True,
            thinking="The action ran; the step is done.",
        )

    def _act(self, intent: StepIntent, step: str, page: PageState) -> _Decision:
        secret_names = placeholders(step)
        if secret_names and intent.kind not in ("type", "select"):
            return _done(
                f"The step uses the secret placeholder {{{{{secret_names[0]}}}}}, but the offline "
                "model puts secret values only into Type and Select steps",
                success=False,
            )
        if intent.kind == "open":
            url = resolve_url(intent.target, self.target_url)
            return self._action(f"Open {url}.", {"navigate": {"url": url, "new_tab": False}})
        if intent.kind == "click":
            element = find_element(page, intent.target)
            if element is None:
                return _not_found(intent.target, page)
            return self._action(
                f'Click {element.describe()}, which matches "{intent.target}".',
                {"click": {"index": element.index}},
            )
        if intent.kind == "type":
            element = find_element(page, intent.target, "field")
            if element is None:
                return _not_found(intent.target, page, "input field")
            return self._action(
                f'Type "{intent.value}" into {element.describe()}, the field "{intent.target}".',
                {
                    "input": {
                        "index": element.index,
                        "text": to_secret_tags(intent.value),
                        "clear": True,
                    }
                },
            )
        if intent.kind == "select":
            element = find_element(page, intent.target, "select")
            if element is None:
                return _not_found(intent.target, page, "dropdown")
            return self._action(
                f'Select "{intent.value}" in {element.describe()}, the dropdown "{intent.target}".',
                {"select_dropdown": {"index": element.index, "text": to_secret_tags(intent.value)}},
            )
        if intent.kind == "press":
            key = _KEY_NAMES.get(intent.target.casefold(), intent.target)
            return self._action(f"Press {key}.", {"send_keys": {"keys": key}})
        if intent.kind in ("check", "check_absent"):
            return self._check(intent, page)
        if intent.kind == "wait":
            return self._wait(intent, page)
        return _done(
            f"The offline model has no action for steps of kind {intent.kind!r}", success=False
        )

    def _action(self, thinking: str, action: dict[str, dict[str, Any]]) -> _Decision:
        self._acted = True
        return _Decision(thinking=thinking, actions=[action], next_goal=thinking)

    def _check(self, intent: StepIntent, page: PageState) -> _Decision:
        shown = text_on_page(page, intent.target)
        wanted = intent.kind == "check"
        if shown == wanted:
            verb = "shows" if wanted else "does not show"
            return _done(
                f'The page {verb} "{intent.target}".',
                success=True,
                thinking=f'Checked {page.url}: it {verb} "{intent.target}".',
            )
        if self._polls < CHECK_POLLS:
            self._polls += 1
            return _poll(
                f'Looking for "{intent.target}" again after a short wait (poll {self._polls}).'
            )
        if wanted:
            return _done(
                f'Text "{intent.target}" was not found on the page',
                success=False,
                thinking=f"Checked {page.url}.",
            )
        return _done(
            f'Text "{intent.target}" is still shown on the page',
            success=False,
            thinking=f"Checked {page.url}.",
        )

    def _wait(self, intent: StepIntent, page: PageState) -> _Decision:
        limit = intent.timeout_seconds or DEFAULT_WAIT_SECONDS
        now = time.monotonic()
        if self._wait_started is None:
            self._wait_started = now
        if text_on_page(page, intent.target):
            return _done(
                f'The page shows "{intent.target}".',
                success=True,
                thinking=f'"{intent.target}" appeared.',
            )
        if now - self._wait_started >= limit:
            return _done(
                f'Text "{intent.target}" was not found on the page within {limit:g} seconds',
                success=False,
                thinking=f'Waited {limit:g} seconds for "{intent.target}".',
            )
        return _poll(f'Waiting for "{intent.target}" to appear.')


def _poll(thinking: str) -> _Decision:
    # browser-use's wait action sleeps `seconds - 1` (0.13.14), so 2 means about one second.
    return _Decision(thinking=thinking, actions=[{"wait": {"seconds": 2}}], next_goal=thinking)


def _done(text: str, success: bool, thinking: str = "") -> _Decision:
    return _Decision(
        thinking=thinking or text,
        actions=[{"done": {"text": text, "success": success}}],
        next_goal="Report the result of the step.",
    )


def _not_found(target: str, page: PageState, kind: str = "element") -> _Decision:
    names = ", ".join(element.describe() for element in page.elements[:30]) or "none"
    return _done(
        f'No {kind} matching "{target}" was found on the page',
        success=False,
        thinking=f'Looked for {kind} "{target}" on {page.url or "the page"}; interactive elements: {names}',
    )


def _last_step_result(texts: list[str]) -> str:
    """Return the result lines of the last `<step>` block of the agent history."""
    for text in reversed(texts):
        match = _HISTORY.search(text)
        if match is None:
            continue
        history = match.group("history")
        last = history.rsplit("<step", 1)
        if len(last) < 2:
            return ""
        block = last[1]
        if "Result" in block:
            block = block.split("Result", 1)[1]
        return " ".join(
            line.strip() for line in block.splitlines() if line.strip() and not line.startswith(">")
        )
    return ""
