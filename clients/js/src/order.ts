/**
 * Optional ordering by `seq` (proto/README.md, "Delivery, deduplication and order"): a replay and
 * live messages can interleave, and a message sent again arrives after newer ones. Notifications
 * are held for `windowMs` after they arrive and let out in `seq` order: each release lets out
 * every held notification up to the highest `seq` whose wait is over. Ordering is as good as the
 * window: one arriving later than that is let out late, after higher ones.
 */

export interface Held<T> {
  readonly seq: number;
  readonly item: T;
  readonly arrivedMs: number;
}

export class SeqOrder<T> {
  readonly windowMs: number;
  #held: Held<T>[] = [];

  constructor(windowMs: number) {
    this.windowMs = Math.max(0, windowMs);
  }

  get size(): number {
    return this.#held.length;
  }

  push(seq: number, item: T, nowMs: number): void {
    this.#held.push({ seq, item, arrivedMs: nowMs });
  }

  /** What may go out now, lowest `seq` first. */
  release(nowMs: number): T[] {
    let cut = Number.NEGATIVE_INFINITY;
    for (const h of this.#held) {
      if (h.arrivedMs + this.windowMs <= nowMs && h.seq > cut) cut = h.seq;
    }
    if (cut === Number.NEGATIVE_INFINITY) return [];
    const out = this.#held.filter((h) => h.seq <= cut).sort((a, b) => a.seq - b.seq);
    this.#held = this.#held.filter((h) => h.seq > cut);
    return out.map((h) => h.item);
  }

  /** Everything held, in `seq` order (when the client closes). */
  flush(): T[] {
    const out = this.#held.sort((a, b) => a.seq - b.seq).map((h) => h.item);
    this.#held = [];
    return out;
  }

  /** Ms until the next release has something, or null when nothing is held. */
  nextInMs(nowMs: number): number | null {
    if (this.#held.length === 0) return null;
    const first = Math.min(...this.#held.map((h) => h.arrivedMs));
    return Math.max(0, first + this.windowMs - nowMs);
  }
}
