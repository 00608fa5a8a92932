/**
 * One user's connection to Herald, kept open: connect with a fresh token, read the gateway's
 * frames, hand each message to the application once, ack it, and reconnect after every ending
 * the protocol says to. The decisions are in the small modules next to this one (backoff,
 * reconnect, seen, acks, order, liveness); this file owns the socket, the timers and the events.
 */

import { AckQueue } from "./acks.js";
import type { AckKind, PacingOptions } from "./acks.js";
import { Backoff } from "./backoff.js";
import type { BackoffOptions } from "./backoff.js";
import { deadline } from "./liveness.js";
import { SeqOrder } from "./order.js";
import type { Hello, Notification, TopicNotification, TopicRefusal } from "./protocol.js";
import { decide } from "./reconnect.js";
import { refreshAt } from "./refresh.js";
import type { TokenReason } from "./reconnect.js";
import { SeenIds } from "./seen.js";
import type { SeenOptions } from "./seen.js";
import { TopicSubscriptions } from "./topics.js";
import type { TopicHandler, TopicStatus } from "./topics.js";

/** The part of a WebSocket this client uses: the browser's, Node's global one, or `ws`. */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  /** `ws` only: pings and refused upgrades become visible through it. */
  on?(event: string, listener: (...args: never[]) => void): unknown;
  /** `ws` only: drop the connection without a closing handshake. */
  terminate?(): void;
}

export type WebSocketConstructor = new (url: string, options?: { headers?: Record<string, string> }) => WebSocketLike;

export interface TokenRequest {
  /** 1 for the first attempt, counting up until a connection gets `hello`; 1 for a refresh. */
  readonly attempt: number;
  /**
   * `connect`: any valid token will do. `expired`: the last one expired (4401). `unauthorized`:
   * the last attempt was refused (HTTP 401), or, in a browser, ended before `hello` for a reason
   * the browser hides: do not hand out the same token again. `refresh`: the open connection's
   * token expires soon: a token with a later `exp` (same user) keeps the connection open.
   */
  readonly reason: TokenReason;
}

export interface HeraldClientOptions {
  /**
   * The gateway, e.g. `wss://push.example.com` (`/v1/connect` is added unless the path already
   * ends with it), or a function asked before every attempt (to try several gateways in turn).
   */
  url: string | (() => string | Promise<string>);
  /** A JWT for the user, asked before every attempt. */
  getToken: (request: TokenRequest) => string | Promise<string>;
  /** The WebSocket implementation; default the global `WebSocket`. In Node 20, pass `ws`. */
  WebSocket?: WebSocketConstructor;
  /**
   * Where the token goes: `header` (Authorization: Bearer, which keeps it out of URLs and logs;
   * needs `ws`), or `query` (`?token=`, the only way in browsers). Default: `header` when a
   * WebSocket implementation is passed, `query` otherwise.
   */
  tokenIn?: "header" | "query";
  /** Ack every notification once the application's handler has seen it. Default true. */
  autoAck?: boolean;
  /** How long acks and reads wait to be batched, in ms. Default 100. */
  ackDelayMs?: number;
  /** Deliver in `seq` order, holding each notification this long (ms) first. Default: off. */
  orderWindowMs?: number;
  /** No `hello` within this many ms counts as a failed attempt. Default 15000. */
  connectTimeoutMs?: number;
  backoff?: BackoffOptions;
  dedupe?: SeenOptions;
  /** The gateway's limits, if a deployment changed them from the defaults. */
  limits?: PacingOptions;
  /**
   * Send a fresh token (`getToken` with reason `refresh`) before the connection's token expires,
   * so the gateway keeps the connection open instead of closing it with 4401. Default true.
   */
  refreshTokens?: boolean;
}

export type ConnectionState =
  | { readonly state: "connecting"; readonly attempt: number }
  | { readonly state: "open"; readonly hello: Hello }
  | {
      readonly state: "closed";
      /** The close code; 1006 when the connection was lost or refused without one. */
      readonly code: number;
      readonly reason: string;
      /** The HTTP status of a refused upgrade, where the runtime shows it (`ws`). */
      readonly httpStatus?: number;
      /** The `error` frame's code, when the gateway sent one before closing. */
      readonly error?: string;
      /** Whether the client will connect again, and after how many ms. */
      readonly willReconnect: boolean;
      readonly delayMs?: number;
    };

interface Events {
  state: ConnectionState;
  /** A message, the first time it arrives. */
  notification: Notification;
  /** A copy of a message already handed out: not shown again (for the application's metrics). */
  duplicate: Notification;
  /** The gateway took a `subscribe` (`recovered`: see TopicStatus). */
  subscribed: { readonly topic: string; readonly recovered?: boolean };
  /** The gateway refused a `subscribe`: the handlers get nothing until the next connection tries again. */
  topicRefused: { readonly topic: string; readonly reason: TopicRefusal; readonly message: string };
  error: Error;
}

type Listener<T> = (value: T) => void;

/** One attempt's socket and what the client knows about it. */
interface Connection {
  socket: WebSocketLike;
  hello: Hello | null;
  queue: AckQueue | null;
  lastActivityMs: number;
  /** When the gateway closes the connection unless it gets a fresh token (`hello`, `refreshed`). */
  tokenExpiresAtMs?: number;
  httpStatus?: number;
  errorCode?: string;
  ended: boolean;
}

const OPEN = 1;
const PRUNE_EVERY_MS = 60_000;
/** A failed refresh (no token from the provider) is tried again this much later. */
const REFRESH_RETRY_MS = 5_000;
/** setTimeout's longest delay; a later refresh is re-armed when it fires. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export class HeraldClient {
  readonly #options: HeraldClientOptions;
  readonly #WebSocket: WebSocketConstructor;
  readonly #tokenIn: "header" | "query";
  readonly #autoAck: boolean;
  readonly #ackDelayMs: number;
  readonly #connectTimeoutMs: number;
  readonly #backoff: Backoff;
  readonly #seen: SeenIds;
  readonly #order: SeqOrder<Notification> | null;
  readonly #listeners: { [K in keyof Events]: Set<Listener<Events[K]>> } = {
    state: new Set(),
    notification: new Set(),
    duplicate: new Set(),
    subscribed: new Set(),
    topicRefused: new Set(),
    error: new Set(),
  };
  readonly #topics = new TopicSubscriptions();

  #conn: Connection | null = null;
  /** Reads asked for while no connection was open, sent after the next `hello`. */
  readonly #unsentReads = new Set<string>();
  #attempt = 0;
  #stopped = true;
  #nextToken: TokenReason = "connect";
  #retryTimer: ReturnType<typeof setTimeout> | undefined;
  #flushTimer: ReturnType<typeof setTimeout> | undefined;
  #livenessTimer: ReturnType<typeof setTimeout> | undefined;
  #connectTimer: ReturnType<typeof setTimeout> | undefined;
  #orderTimer: ReturnType<typeof setTimeout> | undefined;
  #refreshTimer: ReturnType<typeof setTimeout> | undefined;
  #pruneTimer: ReturnType<typeof setInterval> | undefined;

  constructor(options: HeraldClientOptions) {
    this.#options = options;
    const WebSocketImpl = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (WebSocketImpl === undefined) {
      throw new TypeError("no global WebSocket here: pass one, e.g. `new HeraldClient({ WebSocket: ws, ... })`");
    }
    this.#WebSocket = WebSocketImpl;
    this.#tokenIn = options.tokenIn ?? (options.WebSocket === undefined ? "query" : "header");
    this.#autoAck = options.autoAck ?? true;
    this.#ackDelayMs = Math.max(0, options.ackDelayMs ?? 100);
    this.#connectTimeoutMs = Math.max(1, options.connectTimeoutMs ?? 15_000);
    this.#backoff = new Backoff(options.backoff);
    this.#seen = new SeenIds(options.dedupe);
    this.#order = options.orderWindowMs === undefined ? null : new SeqOrder(options.orderWindowMs);
  }

  /** Subscribes to an event; returns the function that unsubscribes. */
  on<K extends keyof Events>(event: K, listener: Listener<Events[K]>): () => void {
    this.#listeners[event].add(listener);
    return () => this.#listeners[event].delete(listener);
  }

  /** The current connection's `hello`, or null while not connected. */
  get hello(): Hello | null {
    return this.#conn?.hello ?? null;
  }

  /** Ids remembered for deduplication. */
  get remembered(): number {
    return this.#seen.size;
  }

  /** Starts connecting (and reconnecting, until `close()`). */
  connect(): void {
    if (!this.#stopped) return;
    this.#stopped = false;
    this.#pruneTimer = setInterval(() => this.#seen.prune(Date.now()), PRUNE_EVERY_MS);
    void this.#open();
  }

  /**
   * Calls `handler` with every message published to `topic` from now on, on this connection and
   * every later one: each new connection subscribes again from the last offset seen, so what
   * was published while disconnected comes first, as far as Herald still keeps it (the
   * `subscribed` event says `recovered: false` when some of it is gone). Returns the function
   * that removes the handler (and unsubscribes with the topic's last one). The token must allow
   * the topic (its `topics` claim), or the `topicRefused` event says why not.
   */
  subscribe(topic: string, handler: TopicHandler): () => void {
    if (this.#topics.add(topic, handler)) this.#sendTopicFrame(this.#topics.frame(topic));
    return () => {
      if (this.#topics.remove(topic, handler)) this.#sendTopicFrame({ type: "unsubscribe", topic });
    };
  }

  /** What the gateway last said of a topic subscription; undefined for a topic not subscribed. */
  topicStatus(topic: string): TopicStatus | undefined {
    return this.#topics.status(topic);
  }

  /** Acks these messages (needed only with `autoAck: false`). */
  ack(ids: Iterable<string>): void {
    this.#enqueue("ack", ids);
  }

  /** Tells Herald the user has seen these messages: their receipts become `read`. */
  read(ids: Iterable<string>): void {
    this.#enqueue("read", ids);
  }

  /**
   * Sends the acks and reads the rate limits allow right now, closes with 1000 and stops
   * reconnecting. Notifications held for ordering are dropped unacked: they come again on the
   * user's next connection. Resolves once the socket has closed (or after a second).
   */
  async close(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#clearTimers();
    clearInterval(this.#pruneTimer);
    this.#order?.flush();
    const conn = this.#conn;
    this.#conn = null;
    if (conn === null || conn.ended) {
      this.#emit("state", { state: "closed", code: 1000, reason: "closed by the application", willReconnect: false });
      return;
    }
    conn.ended = true;
    this.#flush(conn);
    await new Promise<void>((resolve) => {
      const done = setTimeout(() => {
        conn.socket.terminate?.();
        resolve();
      }, 1_000);
      conn.socket.onclose = () => {
        clearTimeout(done);
        resolve();
      };
      try {
        conn.socket.close(1000, "client closed");
      } catch {
        clearTimeout(done);
        resolve();
      }
    });
    this.#emit("state", { state: "closed", code: 1000, reason: "closed by the application", willReconnect: false });
  }

  // --- connecting -------------------------------------------------------------------------------

  async #open(): Promise<void> {
    this.#attempt += 1;
    const attempt = this.#attempt;
    this.#emit("state", { state: "connecting", attempt });
    let url: URL;
    let token: string;
    try {
      const reason = this.#nextToken;
      [url, token] = await Promise.all([this.#url(), this.#options.getToken({ attempt, reason })]);
    } catch (e) {
      this.#emit("error", asError(e, "the token provider or url function failed"));
      if (!this.#stopped) this.#retry({ code: 1006, reason: "no token or url", opened: false });
      return;
    }
    if (this.#stopped) return;
    this.#nextToken = "connect";
    let socket: WebSocketLike;
    try {
      if (this.#tokenIn === "header") {
        socket = new this.#WebSocket(url.toString(), { headers: { Authorization: `Bearer ${token}` } });
      } else {
        url.searchParams.set("token", token);
        socket = new this.#WebSocket(url.toString());
      }
    } catch (e) {
      this.#emit("error", asError(e, "could not create the WebSocket"));
      this.#retry({ code: 1006, reason: "could not create the WebSocket", opened: false });
      return;
    }
    const conn: Connection = { socket, hello: null, queue: null, lastActivityMs: Date.now(), ended: false };
    this.#conn = conn;
    this.#watch(conn);
    this.#connectTimer = setTimeout(() => {
      if (conn.hello === null) this.#drop(conn, `no hello within ${this.#connectTimeoutMs} ms`);
    }, this.#connectTimeoutMs);
  }

  async #url(): Promise<URL> {
    const base = typeof this.#options.url === "function" ? await this.#options.url() : this.#options.url;
    const url = new URL(base);
    if (!url.pathname.endsWith("/v1/connect")) url.pathname = `${url.pathname.replace(/\/$/, "")}/v1/connect`;
    // A text frame each heartbeat interval: the sign of life a browser can see (see liveness.ts).
    url.searchParams.set("heartbeat", "frame");
    return url;
  }

  #watch(conn: Connection): void {
    const { socket } = conn;
    socket.onmessage = (event) => {
      if (this.#conn !== conn || conn.ended) return;
      conn.lastActivityMs = Date.now();
      if (typeof event.data === "string") this.#frame(conn, event.data);
    };
    socket.onclose = (event) => {
      if (this.#conn !== conn || conn.ended) return;
      this.#ended(conn, event.code, event.reason);
    };
    socket.onerror = () => {
      // A close event follows every error; it carries what is known.
    };
    if (typeof socket.on === "function") {
      socket.on("ping", () => {
        conn.lastActivityMs = Date.now();
      });
      // Without this listener `ws` reports a refused upgrade as a bare error; with it, the status.
      socket.on("unexpected-response", ((_request: unknown, response: { statusCode?: number; resume?: () => void }) => {
        if (typeof response.statusCode === "number") conn.httpStatus = response.statusCode;
        response.resume?.();
        socket.terminate?.();
      }) as never);
    }
  }

  #frame(conn: Connection, text: string): void {
    let frame: unknown;
    try {
      frame = JSON.parse(text);
    } catch {
      this.#emit("error", new Error("the gateway sent a frame that is not JSON"));
      return;
    }
    if (typeof frame !== "object" || frame === null) return;
    const f = frame as { type?: unknown };
    switch (f.type) {
      case "hello":
        this.#hello(conn, frame as Hello);
        break;
      case "notification":
        this.#notification(conn, frame as Notification);
        break;
      case "topic_message":
        this.#topicMessage(conn, frame as TopicNotification);
        break;
      case "subscribed": {
        const { topic, recovered } = frame as { topic?: unknown; recovered?: unknown };
        if (typeof topic !== "string") break;
        const answer = typeof recovered === "boolean" ? { topic, recovered } : { topic };
        this.#topics.answered(topic, { state: "subscribed", ...answer });
        this.#emit("subscribed", answer);
        break;
      }
      case "topic_refused": {
        const r = frame as { request?: unknown; topic?: unknown; reason?: unknown; message?: unknown };
        if (r.request !== "subscribe" || typeof r.topic !== "string") break;
        const refusal = { topic: r.topic, reason: r.reason as TopicRefusal, message: String(r.message ?? "") };
        this.#topics.answered(r.topic, { state: "refused", reason: refusal.reason, message: refusal.message });
        this.#emit("topicRefused", refusal);
        break;
      }
      case "error": {
        const code = (frame as { code?: unknown }).code;
        if (typeof code === "string") conn.errorCode = code;
        break;
      }
      case "refreshed": {
        const expiresAt = (frame as { token_expires_at_ms?: unknown }).token_expires_at_ms;
        if (typeof expiresAt === "number") {
          conn.tokenExpiresAtMs = expiresAt;
          this.#armRefresh(conn);
        }
        break;
      }
      default:
        // Frames of later versions: ignored, as the protocol asks.
        break;
    }
  }

  #hello(conn: Connection, hello: Hello): void {
    if (conn.hello !== null) return;
    conn.hello = hello;
    conn.queue = new AckQueue(Date.now(), this.#options.limits);
    clearTimeout(this.#connectTimer);
    this.#attempt = 0;
    this.#backoff.reset();
    this.#emit("state", { state: "open", hello });
    if (this.#unsentReads.size > 0) {
      conn.queue.add("read", this.#unsentReads);
      this.#unsentReads.clear();
      this.#scheduleFlush(conn);
    }
    // Every topic again, from the last offset seen: the recovery of what this client missed.
    for (const frame of this.#topics.resubscribe()) this.#sendTopicFrame(frame);
    this.#armLiveness(conn);
    if (typeof hello.token_expires_at_ms === "number") conn.tokenExpiresAtMs = hello.token_expires_at_ms;
    this.#armRefresh(conn);
  }

  // --- token refresh ----------------------------------------------------------------------------

  /** Sets the timer of the next refresh, from the connection's token expiry (see refresh.ts). */
  #armRefresh(conn: Connection, notBeforeMs = 0): void {
    clearTimeout(this.#refreshTimer);
    this.#refreshTimer = undefined;
    if (this.#options.refreshTokens === false) return;
    const at = refreshAt(conn.tokenExpiresAtMs, Date.now());
    if (at === null) return;
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, Math.max(at, notBeforeMs) - Date.now()));
    this.#refreshTimer = setTimeout(() => {
      this.#refreshTimer = undefined;
      void this.#refresh(conn);
    }, delay);
  }

  async #refresh(conn: Connection): Promise<void> {
    if (this.#conn !== conn || conn.ended) return;
    const at = refreshAt(conn.tokenExpiresAtMs, Date.now());
    if (at === null) return;
    if (at > Date.now()) {
      // A timer capped at setTimeout's longest delay: not due yet.
      this.#armRefresh(conn);
      return;
    }
    let token: string;
    try {
      token = await this.#options.getToken({ attempt: 1, reason: "refresh" });
    } catch (e) {
      this.#emit("error", asError(e, "the token provider failed to refresh"));
      // Again shortly, while the token lasts; past it, the gateway closes with 4401 and the
      // reconnect asks for a token as usual.
      if (this.#conn === conn && !conn.ended) this.#armRefresh(conn, Date.now() + REFRESH_RETRY_MS);
      return;
    }
    if (this.#conn !== conn || conn.ended || conn.socket.readyState !== OPEN) return;
    try {
      // Answered with `refreshed`, which arms the next one; a refused token closes with 4401.
      conn.socket.send(JSON.stringify({ type: "refresh", token }));
    } catch (e) {
      this.#emit("error", asError(e, "send failed"));
    }
  }

  // --- notifications and acks -------------------------------------------------------------------

  #notification(conn: Connection, n: Notification): void {
    if (typeof n.id !== "string" || typeof n.seq !== "number" || typeof n.expires_at_ms !== "number") {
      this.#emit("error", new Error("the gateway sent a notification without id, seq or expires_at_ms"));
      return;
    }
    const now = Date.now();
    const publishedAt = typeof n.published_at_ms === "number" ? n.published_at_ms : now;
    if (!this.#seen.add(n.id, n.expires_at_ms, publishedAt, now)) {
      // A copy: not shown again, but acked again (or read again) if the application got that far,
      // since a lost ack is what brought it back.
      this.#emit("duplicate", n);
      const state = this.#seen.state(n.id);
      if (state === "read") this.#enqueueOn(conn, "read", [n.id]);
      else if (state === "acked") this.#enqueueOn(conn, "ack", [n.id]);
      return;
    }
    if (this.#order === null) {
      this.#deliver(n);
      return;
    }
    this.#order.push(n.seq, n, now);
    this.#scheduleOrder();
  }

  #topicMessage(conn: Connection, m: TopicNotification): void {
    if (typeof m.topic !== "string" || typeof m.offset !== "number" || typeof m.id !== "string") {
      this.#emit("error", new Error("the gateway sent a topic message without topic, offset or id"));
      return;
    }
    const handlers = this.#topics.accept(m);
    for (const handler of handlers) {
      try {
        handler(m);
      } catch (e) {
        this.#emit("error", asError(e, "a topic handler threw"));
      }
    }
    // Optional for a topic message: only counted, in its aggregate receipt.
    if (handlers.length > 0 && this.#autoAck) this.#enqueueOn(conn, "ack", [m.id]);
  }

  /** A `subscribe` or `unsubscribe`, on the open connection if there is one (else the next `hello` subscribes). */
  #sendTopicFrame(frame: { type: "subscribe" | "unsubscribe"; topic: string; since?: number }): void {
    const conn = this.#conn;
    if (conn === null || conn.ended || conn.hello === null || conn.socket.readyState !== OPEN) return;
    try {
      conn.socket.send(JSON.stringify(frame));
    } catch (e) {
      this.#emit("error", asError(e, "send failed"));
    }
  }

  #deliver(n: Notification): void {
    this.#emit("notification", n);
    if (this.#autoAck) this.#enqueue("ack", [n.id]);
  }

  #scheduleOrder(): void {
    const order = this.#order;
    if (order === null || this.#orderTimer !== undefined) return;
    const wait = order.nextInMs(Date.now());
    if (wait === null) return;
    this.#orderTimer = setTimeout(() => {
      this.#orderTimer = undefined;
      for (const n of order.release(Date.now())) this.#deliver(n);
      this.#scheduleOrder();
    }, wait);
  }

  #enqueue(kind: AckKind, ids: Iterable<string>): void {
    const list = [...ids];
    for (const id of list) this.#seen.mark(id, kind === "read" ? "read" : "acked");
    const conn = this.#conn;
    if (conn?.queue != null && !conn.ended) {
      this.#enqueueOn(conn, kind, list);
    } else if (kind === "read") {
      for (const id of list) this.#unsentReads.add(id);
    }
    // An ack with no connection is pointless: it counts only on the connection that was sent
    // the message, which is gone. The message comes again and is acked then.
  }

  #enqueueOn(conn: Connection, kind: AckKind, ids: string[]): void {
    if (conn.queue === null || conn.ended) return;
    conn.queue.add(kind, ids);
    this.#scheduleFlush(conn, this.#ackDelayMs);
  }

  #scheduleFlush(conn: Connection, delayMs = 0): void {
    if (this.#flushTimer !== undefined) return;
    this.#flushTimer = setTimeout(() => {
      this.#flushTimer = undefined;
      if (this.#conn === conn && !conn.ended) this.#flush(conn);
    }, delayMs);
  }

  #flush(conn: Connection): void {
    if (conn.queue === null || conn.hello === null || conn.socket.readyState !== OPEN) return;
    const batch = conn.queue.take(Date.now(), conn.hello.max_frame_bytes);
    for (const frame of batch.frames) {
      try {
        conn.socket.send(JSON.stringify(frame));
      } catch (e) {
        this.#emit("error", asError(e, "send failed"));
        return;
      }
    }
    if (batch.retryInMs !== null && !conn.ended) this.#scheduleFlush(conn, batch.retryInMs);
  }

  // --- endings ----------------------------------------------------------------------------------

  #armLiveness(conn: Connection): void {
    clearTimeout(this.#livenessTimer);
    const interval = conn.hello?.heartbeat_interval_ms ?? 0;
    const at = deadline(conn.lastActivityMs, interval);
    if (at === null) return;
    this.#livenessTimer = setTimeout(() => {
      if (this.#conn !== conn || conn.ended) return;
      const now = Date.now();
      const due = deadline(conn.lastActivityMs, interval);
      if (due !== null && now >= due) {
        this.#drop(conn, `no ping or frame from the gateway for ${now - conn.lastActivityMs} ms`);
      } else {
        this.#armLiveness(conn);
      }
    }, Math.max(0, at - Date.now()));
  }

  /** Gives up on a connection that is dead or never opened, without waiting for its close. */
  #drop(conn: Connection, reason: string): void {
    try {
      if (conn.socket.terminate !== undefined) conn.socket.terminate();
      else conn.socket.close(4000, "dead connection");
    } catch {
      // Already closed: nothing to release.
    }
    this.#ended(conn, 1006, reason);
  }

  #ended(conn: Connection, code: number, reason: string): void {
    conn.ended = true;
    conn.queue?.clear();
    this.#clearTimers();
    const opened = conn.hello !== null;
    const ending = {
      code,
      reason,
      opened,
      ...(conn.httpStatus === undefined ? {} : { httpStatus: conn.httpStatus }),
      ...(conn.errorCode === undefined ? {} : { error: conn.errorCode }),
    };
    this.#conn = null;
    this.#retry(ending);
  }

  #retry(ending: { code: number; reason: string; opened: boolean; httpStatus?: number; error?: string }): void {
    if (this.#stopped) return;
    const decision = decide(ending);
    const report = { state: "closed" as const, ...ending };
    delete (report as { opened?: boolean }).opened;
    if (decision.action === "stop") {
      this.#stopped = true;
      clearInterval(this.#pruneTimer);
      this.#emit("error", new Error(decision.why));
      this.#emit("state", { ...report, willReconnect: false });
      return;
    }
    this.#nextToken = decision.token;
    let delayMs: number;
    if (decision.action === "backoff") {
      this.#backoff.atLeast(decision.minStepMs);
      delayMs = this.#backoff.next();
    } else {
      delayMs = Math.random() * decision.spreadMs;
    }
    this.#emit("state", { ...report, willReconnect: true, delayMs });
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = undefined;
      if (!this.#stopped) void this.#open();
    }, delayMs);
  }

  #clearTimers(): void {
    for (const timer of [
      this.#retryTimer,
      this.#flushTimer,
      this.#livenessTimer,
      this.#connectTimer,
      this.#orderTimer,
      this.#refreshTimer,
    ]) {
      clearTimeout(timer);
    }
    this.#retryTimer = this.#flushTimer = this.#livenessTimer = this.#connectTimer = this.#refreshTimer = undefined;
    // Held notifications stay held across a reconnect; their timer is started again.
    this.#orderTimer = undefined;
    if (!this.#stopped) this.#scheduleOrder();
  }

  #emit<K extends keyof Events>(event: K, value: Events[K]): void {
    for (const listener of this.#listeners[event]) {
      try {
        listener(value);
      } catch (e) {
        if (event !== "error") this.#emit("error", asError(e, `a ${event} listener threw`));
      }
    }
  }
}

function asError(e: unknown, context: string): Error {
  return e instanceof Error ? e : new Error(`${context}: ${String(e)}`);
}
