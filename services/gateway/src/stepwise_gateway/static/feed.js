// A session's events, exactly once each and in order: a REST catch-up, then the
// WebSocket from the last seq seen. A dropped socket reconnects with
// `since=<last seq>` after a growing delay. An event that arrives past a gap
// triggers a REST read of the missing ones, and a seq already held is dropped.

import { api } from "./api.js";

const PAGE = 1000;
const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 10000;
const REPLY_TIMEOUT_MS = 15000;
// Close codes after which reconnecting cannot help.
const FINAL_CLOSE_CODES = new Map([
  [4404, "the gateway knows no session with this id"],
  [4422, "the gateway rejected the stream request"],
  [4401, "the gateway needs an API token: open this page once with ?token=<token>"],
  [4403, "this API token may not read the session"],
]);

export class EventFeed {
  constructor(sessionId, { onEvents, onConnection, onReply }) {
    this.sessionId = sessionId;
    this.onEvents = onEvents;
    this.onConnection = onConnection;
    this.onReply = onReply;
    this.events = [];
    this.stats = { duplicates: 0, gapsFilled: 0, reconnects: 0 };
    this.socket = null;
    this.attempt = 0;
    this.retryTimer = null;
    this.closed = false;
    this.chain = Promise.resolve();
    this.waiting = new Map();
    this.requestCounter = 0;
  }

  get lastSeq() {
    return this.events.length;
  }

  get isOpen() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  async start() {
    this.setConnection("connecting", "Loading the session's events…");
    try {
      await this.fetchAfter(this.lastSeq);
    } catch (error) {
      if (error.status === 404) {
        this.setConnection("closed", `No session with id ${this.sessionId}: check the link, or create a session.`);
        return;
      }
      if (error.status === 401 || error.status === 403) {
        this.setConnection("closed", `Not allowed to read this session: ${error.message}`);
        return;
      }
      // The socket below sends every event after the last one held, so a failed read loses nothing.
    }
    this.connect();
  }

  close() {
    this.closed = true;
    clearTimeout(this.retryTimer);
    if (this.socket) this.socket.close(1000, "page closed");
    for (const { reject, timer } of this.waiting.values()) {
      clearTimeout(timer);
      reject(new Error("the page closed the connection"));
    }
    this.waiting.clear();
  }

  setConnection(state, message) {
    this.connection = state;
    this.onConnection(state, message);
  }

  // Run ingest work one piece at a time, so gap reads and socket messages never interleave.
  serialized(work) {
    this.chain = this.chain.then(work).catch((error) => {
      this.setConnection("error", `Could not read the session's events: ${error.message}`);
    });
    return this.chain;
  }

  // Read every event after `since` through REST pages, up to `until` when given.
  async fetchAfter(since, until = Infinity) {
    let cursor = since;
    for (;;) {
      const page = await api.events(this.sessionId, cursor, PAGE);
      const fresh = this.accept(page.events.filter((event) => event.seq <= until));
      if (fresh.length) this.onEvents(fresh);
      if (page.events.length === 0 || page.next_since >= Math.min(page.last_seq, until)) return;
      cursor = page.next_since;
    }
  }

  // Keep events that extend the dense sequence; count the ones already held.
  accept(list) {
    const fresh = [];
    for (const event of [...list].sort((a, b) => a.seq - b.seq)) {
      if (event.seq <= this.lastSeq) {
        this.stats.duplicates += 1;
      } else if (event.seq === this.lastSeq + 1) {
        this.events.push(event);
        fresh.push(event);
      }
    }
    return fresh;
  }

  async ingest(event) {
    if (event.seq <= this.lastSeq) {
      this.stats.duplicates += 1;
      return;
    }
    if (event.seq > this.lastSeq + 1) {
      this.stats.gapsFilled += 1;
      try {
        await this.fetchAfter(this.lastSeq, event.seq - 1);
      } catch (error) {
        // Reconnecting resumes after the last event held, which refills the gap.
        if (this.socket) this.socket.close(4000, "gap read failed");
        throw error;
      }
    }
    const fresh = this.accept([event]);
    if (fresh.length) this.onEvents(fresh);
  }

  connect() {
    if (this.closed) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/api/sessions/${encodeURIComponent(this.sessionId)}/ws?since=${this.lastSeq}`;
    this.setConnection(this.attempt ? "reconnecting" : "connecting", this.attempt ? "Reconnecting…" : "Connecting…");
    const socket = new WebSocket(url);
    this.socket = socket;
    socket.addEventListener("open", () => {
      if (this.attempt) this.stats.reconnects += 1;
      this.attempt = 0;
      this.setConnection("live", "Live");
    });
    socket.addEventListener("message", (message) => this.onMessage(message.data));
    socket.addEventListener("close", (close) => this.onClose(socket, close));
  }

  onMessage(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    if (typeof message.seq === "number" && message.session_id === this.sessionId && typeof message.type === "string") {
      this.serialized(() => this.ingest(message));
      return;
    }
    const pending = message.request_id ? this.waiting.get(message.request_id) : null;
    if (pending) {
      clearTimeout(pending.timer);
      this.waiting.delete(message.request_id);
      pending.resolve(message);
    }
    if (this.onReply) this.onReply(message);
  }

  onClose(socket, close) {
    if (socket !== this.socket || this.closed) return;
    this.socket = null;
    for (const [id, { reject, timer }] of this.waiting) {
      clearTimeout(timer);
      reject(new Error("the connection dropped before the gateway responded; check the event log"));
      this.waiting.delete(id);
    }
    const final = FINAL_CLOSE_CODES.get(close.code);
    if (final) {
      this.setConnection("closed", `Disconnected: ${final}${close.reason ? ` (${close.reason})` : ""}`);
      return;
    }
    const delay = Math.min(MAX_RETRY_MS, FIRST_RETRY_MS * 2 ** this.attempt) * (0.8 + Math.random() * 0.4);
    this.attempt += 1;
    const seconds = Math.max(1, Math.round(delay / 1000));
    this.setConnection(
      "reconnecting",
      `Connection lost; reconnecting in ${seconds} s from event ${this.lastSeq} (attempt ${this.attempt})`,
    );
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  // Send a command message on the socket and wait for the reply with the same request_id.
  command(name, fields = {}) {
    if (!this.isOpen) return null;
    this.requestCounter += 1;
    const requestId = `ui-${Date.now().toString(36)}-${this.requestCounter}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(requestId);
        reject(new Error(`the gateway did not respond to ${name} within ${REPLY_TIMEOUT_MS / 1000} s`));
      }, REPLY_TIMEOUT_MS);
      this.waiting.set(requestId, { resolve, reject, timer });
      this.socket.send(JSON.stringify({ command: name, request_id: requestId, ...fields }));
    });
  }

  reconnectNow() {
    if (this.isOpen || this.closed) return;
    clearTimeout(this.retryTimer);
    this.connect();
  }
}
