// Small DOM and formatting helpers shared by the pages.

// Build an element: h("a", {href: "/", class: "x", onclick: fn}, "text", child, [more]).
export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(element.dataset, value);
    } else if (name in element && typeof value !== "string") {
      element[name] = value;
    } else {
      element.setAttribute(name, value === true ? "" : value);
    }
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : String(child));
  }
}

export function clear(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

export function formatTime(at) {
  if (!at) return "";
  const date = new Date(at);
  return Number.isNaN(date.getTime()) ? String(at) : date.toLocaleTimeString([], { hour12: false });
}

export function formatDateTime(at) {
  if (!at) return "";
  const date = new Date(at);
  if (Number.isNaN(date.getTime())) return String(at);
  return date.toLocaleString([], { dateStyle: "medium", timeStyle: "short", hour12: false });
}

export function formatDuration(ms) {
  if (ms === null || ms === undefined) return "";
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
}

export function statusLabel(status) {
  return String(status || "").replaceAll("_", " ");
}

export function statusBadge(status, extra = {}) {
  return h("span", { class: `badge status-${status}`, ...extra }, statusLabel(status));
}

// A session's title is the first line of its test case; drop a leading "1." or "-" list marker.
export function displayTitle(title) {
  return String(title || "").replace(/^\s*(?:\d+[.)]|[-*•])\s+/, "");
}
