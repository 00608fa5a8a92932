/**
 * Acks and reads on their way to the gateway: batched, packed into frames that fit the gateway's
 * `max_frame_bytes` and `MAX_IDS_PER_FRAME`, and paced so that a connection stays within the
 * gateway's rate limits (`HERALD_CLIENT_FRAMES_PER_SEC`, `HERALD_CLIENT_ACK_IDS_PER_SEC`), which a
 * client that exceeds them pays for with a 4429 close. Sockets and timers are the client's.
 */

import { MAX_IDS_PER_FRAME } from "./protocol.js";
import type { ClientFrame } from "./protocol.js";

export type AckKind = ClientFrame["type"];

/** Bytes of `{"type":"ack","ids":[]}` (or `read`) around the ids. */
function overhead(kind: AckKind): number {
  return JSON.stringify({ type: kind, ids: [] }).length;
}

/** UTF-8 length of a JSON string literal: message ids are ASCII by their grammar, but be exact. */
function encodedLength(id: string): number {
  return new TextEncoder().encode(JSON.stringify(id)).length;
}

/**
 * Splits `ids` into as few frames as possible, each at most `maxFrameBytes` long and at most
 * `maxIds` ids. An id that cannot fit in a frame on its own is left out (no valid id is that long
 * for any sane limit: 128 bytes against a default of 16 KiB).
 */
export function chunkIds(
  kind: AckKind,
  ids: readonly string[],
  maxFrameBytes: number,
  maxIds: number = MAX_IDS_PER_FRAME,
): string[][] {
  const base = overhead(kind);
  const frames: string[][] = [];
  let current: string[] = [];
  let size = base;
  for (const id of ids) {
    const cost = encodedLength(id) + (current.length > 0 ? 1 : 0); // the comma
    if (current.length > 0 && (size + cost > maxFrameBytes || current.length >= maxIds)) {
      frames.push(current);
      current = [];
      size = base;
    }
    const alone = encodedLength(id);
    if (base + alone > maxFrameBytes) continue;
    size += current.length > 0 ? alone + 1 : alone;
    current.push(id);
  }
  if (current.length > 0) frames.push(current);
  return frames;
}

/**
 * A token bucket: `ratePerSec` a second, holding at most `capacity`. The gateway's buckets hold
 * twice their rate; the client's default to the rate itself, so it never needs the burst.
 */
export class TokenBucket {
  readonly ratePerSec: number;
  readonly capacity: number;
  #tokens: number;
  #at: number;

  constructor(ratePerSec: number, capacity: number, nowMs: number) {
    this.ratePerSec = Math.max(1, ratePerSec);
    this.capacity = Math.max(1, capacity);
    this.#tokens = this.capacity;
    this.#at = nowMs;
  }

  available(nowMs: number): number {
    this.#refill(nowMs);
    return Math.floor(this.#tokens);
  }

  take(n: number, nowMs: number): boolean {
    this.#refill(nowMs);
    if (this.#tokens < n) return false;
    this.#tokens -= n;
    return true;
  }

  /** Ms until `n` tokens are there (0: now). `n` is capped at the capacity. */
  waitMs(n: number, nowMs: number): number {
    this.#refill(nowMs);
    const missing = Math.min(n, this.capacity) - this.#tokens;
    return missing <= 0 ? 0 : Math.ceil((missing * 1000) / this.ratePerSec);
  }

  #refill(nowMs: number): void {
    const elapsed = Math.max(0, nowMs - this.#at);
    this.#tokens = Math.min(this.capacity, this.#tokens + (elapsed * this.ratePerSec) / 1000);
    this.#at = nowMs;
  }
}

export interface PacingOptions {
  /** Frames per second this client sends at most. Default 50, the gateway's default. */
  framesPerSec?: number;
  /** Ids per second acked or read at most. Default 2000, the gateway's default. */
  idsPerSec?: number;
}

/** What to send now, and when to look again for the rest (null: nothing left). */
export interface Batch {
  frames: ClientFrame[];
  retryInMs: number | null;
}

/**
 * Ids waiting to be acked or read on one connection. A read implies delivered, so an id waiting
 * for both goes out once, as a read. Cleared when the connection ends: an ack counts only on the
 * connection that was sent the message, and the message will come again.
 */
export class AckQueue {
  readonly #acks = new Set<string>();
  readonly #reads = new Set<string>();
  readonly #frames: TokenBucket;
  readonly #ids: TokenBucket;

  constructor(nowMs: number, options: PacingOptions = {}) {
    const frames = options.framesPerSec ?? 50;
    const ids = options.idsPerSec ?? 2000;
    this.#frames = new TokenBucket(frames, frames, nowMs);
    this.#ids = new TokenBucket(ids, ids, nowMs);
  }

  get size(): number {
    return this.#acks.size + this.#reads.size;
  }

  add(kind: AckKind, ids: Iterable<string>): void {
    for (const id of ids) {
      if (kind === "read") {
        this.#acks.delete(id);
        this.#reads.add(id);
      } else if (!this.#reads.has(id)) {
        this.#acks.add(id);
      }
    }
  }

  clear(): void {
    this.#acks.clear();
    this.#reads.clear();
  }

  /** Takes the frames the rate limits allow now, reads first (they also deliver). */
  take(nowMs: number, maxFrameBytes: number): Batch {
    const frames: ClientFrame[] = [];
    for (const [kind, pending] of [["read", this.#reads], ["ack", this.#acks]] as const) {
      while (pending.size > 0) {
        const allowed = Math.min(this.#ids.available(nowMs), MAX_IDS_PER_FRAME);
        if (allowed === 0 || !this.#frames.take(1, nowMs)) return { frames, retryInMs: this.#retry(nowMs) };
        const ids = [...pending].slice(0, allowed);
        const first = chunkIds(kind, ids, maxFrameBytes)[0] ?? [];
        if (first.length === 0) {
          // Nothing in there can ever fit a frame: drop it rather than retry forever.
          for (const id of ids) pending.delete(id);
          continue;
        }
        this.#ids.take(first.length, nowMs);
        for (const id of first) pending.delete(id);
        frames.push({ type: kind, ids: first });
      }
    }
    return { frames, retryInMs: null };
  }

  #retry(nowMs: number): number {
    return Math.max(this.#frames.waitMs(1, nowMs), this.#ids.waitMs(1, nowMs), 1);
  }
}
