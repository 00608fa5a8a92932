/**
 * The application's topic subscriptions, without a socket: which topics to (re)subscribe to on
 * each connection and from which offset, which topic messages are new (offsets only grow per
 * topic, so a message at or below the last one handed out is a copy), and what the gateway
 * answered. Recovery is automatic: every `hello` re-subscribes with `since` set to the last
 * offset seen, and the gateway sends what was missed first (proto/README.md, "Recovery").
 */

import type { TopicNotification, TopicRefusal } from "./protocol.js";

export type TopicHandler = (message: TopicNotification) => void;

/** What the gateway said of a subscription. */
export type TopicStatus =
  | { readonly state: "pending" }
  /** `recovered`: only after a re-subscribe with `since`: false when messages were missed for good. */
  | { readonly state: "subscribed"; readonly recovered?: boolean }
  | { readonly state: "refused"; readonly reason: TopicRefusal; readonly message: string };

interface Entry {
  handlers: Set<TopicHandler>;
  /** The highest offset handed to the handlers; what `since` is on the next connection. */
  lastOffset: number | null;
  status: TopicStatus;
}

export interface SubscribeFrame {
  type: "subscribe";
  topic: string;
  since?: number;
}

export class TopicSubscriptions {
  readonly #topics = new Map<string, Entry>();

  /** Adds a handler; true if the topic is new (a `subscribe` is due on an open connection). */
  add(topic: string, handler: TopicHandler): boolean {
    const entry = this.#topics.get(topic);
    if (entry !== undefined) {
      entry.handlers.add(handler);
      return false;
    }
    this.#topics.set(topic, { handlers: new Set([handler]), lastOffset: null, status: { state: "pending" } });
    return true;
  }

  /** Removes a handler; true if it was the topic's last (an `unsubscribe` is due). */
  remove(topic: string, handler: TopicHandler): boolean {
    const entry = this.#topics.get(topic);
    if (entry === undefined || !entry.handlers.delete(handler) || entry.handlers.size > 0) return false;
    this.#topics.delete(topic);
    return true;
  }

  /** The `subscribe` frame for one topic: with `since` once a message of it was seen. */
  frame(topic: string): SubscribeFrame {
    const last = this.#topics.get(topic)?.lastOffset ?? null;
    return last === null ? { type: "subscribe", topic } : { type: "subscribe", topic, since: last };
  }

  /** Every topic's `subscribe`, for a new connection; each is pending until answered. */
  resubscribe(): SubscribeFrame[] {
    const frames: SubscribeFrame[] = [];
    for (const [topic, entry] of this.#topics) {
      entry.status = { state: "pending" };
      frames.push(this.frame(topic));
    }
    return frames;
  }

  /** A topic message: its handlers if it is new, none for a copy or a topic given up. */
  accept(message: TopicNotification): TopicHandler[] {
    const entry = this.#topics.get(message.topic);
    if (entry === undefined || (entry.lastOffset !== null && message.offset <= entry.lastOffset)) return [];
    entry.lastOffset = message.offset;
    return [...entry.handlers];
  }

  /** A `subscribed` or `topic_refused` answer. */
  answered(topic: string, status: TopicStatus): void {
    const entry = this.#topics.get(topic);
    if (entry !== undefined) entry.status = status;
  }

  status(topic: string): TopicStatus | undefined {
    return this.#topics.get(topic)?.status;
  }

  get size(): number {
    return this.#topics.size;
  }
}
