// Calls to the gateway's REST API; every failure becomes an ApiError with the server's message.

export class ApiError extends Error {
  constructor(status, code, message, field = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

export async function request(method, path, body = undefined) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: body === undefined ? { Accept: "application/json" } : { "Content-Type": "application/json", Accept: "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (error) {
    throw new ApiError(0, "network", `the gateway did not answer (${error.message}); check that it is running`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const detail = data && data.error ? data.error : {};
    const message = detail.message || `${method} ${path} answered HTTP ${response.status}`;
    throw new ApiError(response.status, detail.code || "http_error", message, detail.field || null);
  }
  return data;
}

export const api = {
  config: () => request("GET", "/ui/config.json"),
  listSessions: (limit = 50) => request("GET", `/api/sessions?limit=${limit}`),
  createSession: (body) => request("POST", "/api/sessions", body),
  events: (sessionId, since, limit = 1000) =>
    request("GET", `/api/sessions/${encodeURIComponent(sessionId)}/events?since=${since}&limit=${limit}`),
  control: (sessionId, path, body = {}) => request("POST", `/api/sessions/${encodeURIComponent(sessionId)}/${path}`, body),
};

export function screenshotUrl(sessionId, name) {
  const relative = name.startsWith(`${sessionId}/`) ? name.slice(sessionId.length + 1) : name;
  return `/api/sessions/${encodeURIComponent(sessionId)}/screenshots/${relative.split("/").map(encodeURIComponent).join("/")}`;
}
