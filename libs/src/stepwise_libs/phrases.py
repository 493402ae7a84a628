"""The step phrases the offline model understands, shared by the offline planner and executor.

The planner uses `split_test_case` and `parse_step` to turn a test case into
steps and to report the parts it could not understand; the executor's offline
chat model uses `parse_step` to map a step onto browser actions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A quoted value: straight or typographic double quotes, or single quotes.
_Q = r"""(?:"(?P<{0}>[^"]*)"|“(?P<{0}_t>[^”]*)”|'(?P<{0}_s>[^']*)')"""


def _quoted(name: str) -> str:
    return _Q.format(name)


@dataclass(frozen=True)
class StepIntent:
    """What one step asks for: an action kind and its arguments."""

    kind: str  # open, click, type, press, select, check, check_absent, wait
    target: str = ""  # URL, element label, key, or text to look for
    value: str = ""  # text to type or option to select
    timeout_seconds: float | None = None


_URL = r"(?P<url>(?:https?://|/)\S*|\S+\.\S+)"
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (
        "open",
        re.compile(
            rf"^(?:open|go to|navigate to|visit|load|browse to)\s+(?:the\s+)?(?:url\s+|page\s+)?{_URL}$",
            re.I,
        ),
    ),
    (
        "open_target",
        re.compile(
            r"^(?:open|go to|navigate to|visit|load)\s+(?:the\s+)?(?:[\w\s-]*\s)?(?:page|site|app|website|url)$",
            re.I,
        ),
    ),
    (
        "type",
        re.compile(
            rf"^(?:type|enter|input|write)\s+{_quoted('value')}\s+(?:into|in|in the|into the)\s+"
            rf"(?:the\s+)?{_quoted('target')}(?:\s+(?:field|box|input))?$",
            re.I,
        ),
    ),
    (
        "type",
        re.compile(
            rf"^(?:fill(?: in)?|set)\s+(?:the\s+)?{_quoted('target')}(?:\s+(?:field|box|input))?\s+"
            rf"(?:with|to)\s+{_quoted('value')}$",
            re.I,
        ),
    ),
    (
        "select",
        re.compile(
            rf"^(?:select|choose|pick)\s+{_quoted('value')}\s+(?:in|from)\s+(?:the\s+)?"
            rf"{_quoted('target')}(?:\s+(?:dropdown|list|menu|select))?$",
            re.I,
        ),
    ),
    (
        "click",
        re.compile(
            rf"^(?:click|tap|press|hit)\s+(?:on\s+)?(?:the\s+)?{_quoted('target')}"
            r"(?:\s+(?:button|link|tab|checkbox|item|icon))?$",
            re.I,
        ),
    ),
    (
        "press",
        re.compile(r"^press\s+(?:the\s+)?(?P<target>[A-Za-z][\w+]*)(?:\s+key)?$", re.I),
    ),
    (
        "check_absent",
        re.compile(
            rf"^(?:check|verify|assert|confirm|ensure|make sure|expect)\s+(?:that\s+)?"
            rf"(?:the\s+)?(?:page\s+)?(?:does not|doesn't|no longer)\s+(?:show|shows|contain|contains|display|displays)"
            rf"\s+{_quoted('target')}$",
            re.I,
        ),
    ),
    (
        "check",
        re.compile(
            rf"^(?:check|verify|assert|confirm|ensure|make sure|expect|see)\s+(?:that\s+)?"
            rf"(?:the\s+)?(?:page\s+|cart badge\s+|badge\s+|title\s+|heading\s+)?"
            rf"(?:shows|show|contains|contain|displays|display|has|reads|says|includes|is)\s+"
            rf"(?:the\s+text\s+)?{_quoted('target')}$",
            re.I,
        ),
    ),
    (
        "check",
        re.compile(
            rf"^(?:check|verify|assert|confirm|ensure|make sure|expect)\s+(?:that\s+)?"
            rf"{_quoted('target')}\s+(?:is\s+)?(?:shown|visible|displayed|present|appears)$",
            re.I,
        ),
    ),
    (
        "wait",
        re.compile(
            rf"^wait\s+(?:for|until)\s+(?:the\s+text\s+)?{_quoted('target')}"
            r"(?:\s+(?:appears|is shown|is visible|to appear))?"
            r"(?:\s+(?:for\s+)?(?:up to\s+)?(?P<seconds>\d+(?:\.\d+)?)\s*(?:s|sec|seconds?))?$",
            re.I,
        ),
    ),
]


def _group(match: re.Match[str], name: str) -> str:
    for key in (name, f"{name}_t", f"{name}_s"):
        value = match.groupdict().get(key)
        if value is not None:
            return value
    return ""


def parse_step(text: str) -> StepIntent | None:
    """Return the intent of one step, or None when the step matches no known phrase."""
    cleaned = text.strip().rstrip(".;!").strip()
    for kind, pattern in _PATTERNS:
        match = pattern.match(cleaned)
        if match is None:
            continue
        if kind == "open":
            return StepIntent("open", target=match.group("url"))
        if kind == "open_target":
            return StepIntent("open", target="")
        seconds = match.groupdict().get("seconds")
        return StepIntent(
            kind,
            target=_group(match, "target"),
            value=_group(match, "value"),
            timeout_seconds=float(seconds) if seconds else None,
        )
    return None


_NUMBERED = re.compile(r"^\s*(?:step\s*)?\d+\s*[.):-]\s*", re.I)
_BULLET = re.compile(r"^\s*[-*•+]\s+")
_THEN = re.compile(r"(?:[,;.]\s*|\s+)(?:and\s+)?then\s+|\s*;\s*", re.I)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def split_test_case(test_case: str) -> list[str]:
    """Split a test case into step texts.

    Numbered lines and bullets each start a step (an unmarked line continues the
    step above it); otherwise lines, sentences and clauses joined by "then"
    each become a step.
    """
    lines = [line.rstrip() for line in test_case.splitlines() if line.strip()]
    marked = [bool(_NUMBERED.match(line) or _BULLET.match(line)) for line in lines]
    pieces: list[str] = []
    if any(marked):
        for line, is_marked in zip(lines, marked, strict=True):
            text = _BULLET.sub("", _NUMBERED.sub("", line, count=1), count=1).strip()
            if is_marked or not pieces:
                pieces.append(text)
            else:
                pieces[-1] = f"{pieces[-1]} {text}"
    else:
        for line in lines:
            pieces.extend(_SENTENCE.split(line.strip()))
    steps: list[str] = []
    for piece in pieces:
        for clause in _THEN.split(piece):
            clause = (
                re.sub(r"^(?:and\s+)?then\s+", "", clause.strip(), flags=re.I).rstrip(".").strip()
            )
            if clause:
                steps.append(clause[0].upper() + clause[1:])
    return steps


# One example of each phrase form `parse_step` understands, for help and error messages.
PHRASE_FORMS: tuple[str, ...] = (
    "Open the login page  (or: Go to https://example.com/path)",
    'Click "Login"',
    'Type "standard_user" into "Username"  (or: Fill "Username" with "standard_user")',
    "Press Enter",
    'Select "Canada" in "Country"',
    'Check that the page shows "Products"',
    'Check that the page does not show "Error"',
    'Wait for "Thank you" up to 10 seconds',
)


def _quote(text: str) -> str:
    """Quote a value with the first quote style that does not occur in it."""
    if '"' not in text:
        return f'"{text}"'
    if "'" not in text:
        return f"'{text}'"
    return f"“{text}”"


def format_step(intent: StepIntent, original: str = "") -> str:
    """Render an intent in the canonical phrase form; `parse_step` reads it back unchanged.

    An "open" step without a URL keeps its `original` wording (such as "Open the
    login page"), because the canonical form would drop which page it names.
    """
    if intent.kind == "open":
        if intent.target:
            return f"Open {intent.target}"
        text = original.strip().rstrip(".;!").strip()
        return text[0].upper() + text[1:] if text else "Open the target page"
    if intent.kind == "click":
        return f"Click {_quote(intent.target)}"
    if intent.kind == "type":
        return f"Type {_quote(intent.value)} into {_quote(intent.target)}"
    if intent.kind == "press":
        return f"Press {intent.target}"
    if intent.kind == "select":
        return f"Select {_quote(intent.value)} in {_quote(intent.target)}"
    if intent.kind == "check":
        return f"Check that the page shows {_quote(intent.target)}"
    if intent.kind == "check_absent":
        return f"Check that the page does not show {_quote(intent.target)}"
    if intent.kind == "wait":
        text = f"Wait for {_quote(intent.target)}"
        if intent.timeout_seconds is not None:
            text += f" up to {intent.timeout_seconds:g} seconds"
        return text
    raise ValueError(f"unknown step kind {intent.kind!r}")
