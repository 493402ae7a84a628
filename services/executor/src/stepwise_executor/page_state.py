"""Parse the page state browser-use 0.13.14 puts in the agent's user message.

Facts this parser relies on (checked against browser-use 0.13.14's DOM serializer):
- The state sits between `<browser_state>` and `</browser_state>`; the element
  tree follows the line `Interactive elements:` and ends at `[End of page]`.
- An interactive element is one line `[index]<tag attr=value ... />`, optionally
  prefixed by `*` (new since the last step) and markers such as `|SHADOW(open)|`
  or `|SCROLL|`. Indices are backend node ids, not 1..N.
- The element's own text follows on lines indented one tab deeper; text that
  belongs to no interactive element (headings, `<label>` text) is a bare line.
- Attribute values are not quoted and may contain spaces (`aria-label=Add Backpack to cart`);
  attributes whose value repeats another attribute are dropped by the serializer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ELEMENT = re.compile(
    r"^(?P<indent>\t*)(?P<markers>(?:\|[^|\[\]]*\|)*)\*?\[(?P<index>\d+)\]<(?P<tag>[\w-]+)(?P<attrs>.*?)\s*/?>\s*$"
)
_ATTRIBUTE_KEY = re.compile(r"(?:^|\s)(?P<key>[a-zA-Z_][\w-]*)=")
_CURRENT_URL = re.compile(r"^Tab \w+: (?P<url>\S+)")

INPUT_TAGS = frozenset({"input", "textarea"})
TOGGLE_TYPES = frozenset({"checkbox", "radio"})


@dataclass
class PageElement:
    index: int
    tag: str
    attributes: dict[str, str]
    line: int  # position among the parsed lines, for label proximity
    depth: int
    texts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.texts)

    @property
    def is_text_field(self) -> bool:
        if self.tag == "textarea" or self.attributes.get("contenteditable") == "true":
            return True
        if self.tag != "input":
            return False
        return self.attributes.get("type", "text") not in TOGGLE_TYPES | {
            "submit",
            "button",
            "reset",
            "file",
            "image",
            "hidden",
        }

    @property
    def is_toggle(self) -> bool:
        return self.tag == "input" and self.attributes.get("type") in TOGGLE_TYPES

    def describe(self) -> str:
        shown = " ".join(
            f"{key}={value}"
            for key, value in self.attributes.items()
            if key != "compound_components"
        )
        label = f" {shown}" if shown else ""
        text = f' "{self.text}"' if self.texts else ""
        return f"[{self.index}]<{self.tag}{label}>{text}"


@dataclass
class PageLine:
    """One line of the element tree: either an element or a bare text line."""

    text: str
    element: PageElement | None = None


@dataclass
class PageState:
    url: str
    elements: list[PageElement]
    lines: list[PageLine]

    @property
    def visible_text(self) -> str:
        """The text of the page as the serializer shows it, one line per text node."""
        parts: list[str] = []
        for line in self.lines:
            if line.element is None:
                parts.append(line.text)
        return "\n".join(parts)


def parse_attributes(raw: str) -> dict[str, str]:
    """Split `key=value key2=value with spaces` into a dict; a value runs up to the next key."""
    raw = raw.strip()
    keys = list(_ATTRIBUTE_KEY.finditer(raw))
    attributes: dict[str, str] = {}
    for position, match in enumerate(keys):
        end = keys[position + 1].start() if position + 1 < len(keys) else len(raw)
        attributes[match.group("key")] = raw[match.end() : end].strip()
    return attributes


def extract_browser_state(message_text: str) -> str | None:
    """Return the text between `<browser_state>` and `</browser_state>`, or None when absent."""
    start = message_text.rfind("<browser_state>")
    if start < 0:
        return None
    end = message_text.find("</browser_state>", start)
    return message_text[start + len("<browser_state>") : end if end >= 0 else len(message_text)]


def parse_page_state(browser_state: str) -> PageState:
    """Parse the serialized browser state into elements and text lines."""
    url = ""
    current_tab = ""
    raw_lines = browser_state.splitlines()
    for raw in raw_lines:
        if raw.startswith("Current tab: "):
            current_tab = raw.removeprefix("Current tab: ").strip()
        match = _CURRENT_URL.match(raw)
        if match and (not current_tab or raw.startswith(f"Tab {current_tab}:")):
            url = match.group("url")
    in_tree = False
    lines: list[PageLine] = []
    elements: list[PageElement] = []
    open_elements: list[PageElement] = []
    for raw in raw_lines:
        if raw.startswith("Interactive elements:"):
            in_tree = True
            continue
        if not in_tree:
            continue
        stripped = raw.strip()
        if stripped in ("[Start of page]", "") or stripped.startswith("... "):
            continue
        if stripped == "[End of page]":
            break
        match = _ELEMENT.match(raw)
        if match:
            depth = len(match.group("indent"))
            element = PageElement(
                index=int(match.group("index")),
                tag=match.group("tag").lower(),
                attributes=parse_attributes(match.group("attrs")),
                line=len(lines),
                depth=depth,
            )
            while open_elements and open_elements[-1].depth >= depth:
                open_elements.pop()
            open_elements.append(element)
            elements.append(element)
            lines.append(PageLine(stripped, element))
            continue
        depth = len(raw) - len(raw.lstrip("\t"))
        while open_elements and open_elements[-1].depth >= depth:
            open_elements.pop()
        if open_elements:
            # Text inside an element belongs to each enclosing element (a link's text is also its row's).
            for owner in open_elements:
                owner.texts.append(stripped)
        lines.append(PageLine(stripped))
    return PageState(url=url, elements=elements, lines=lines)
