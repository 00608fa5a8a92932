/**
 * The ids a client has received, across reconnects, with bounded memory: an id is forgotten once
 * its message has expired (Herald never sends a message after its `expires_at_ms`, so no copy can
 * come after that), and past `maxIds` the ids that expire soonest go first.
 *
 * Expiry is the server's clock. The offset of the local clock is estimated from the notifications
 * themselves: `now - published_at_ms` is the offset plus the delivery delay, so its minimum is the
 * closest estimate (too large, never too small: ids are kept longer, never forgotten early).
 */

/** What the application has done with a message, as the SDK must repeat it to a later copy. */
export type SeenState = "received" | "acked" | "read";

interface Entry {
  expiresAtMs: number;
  state: SeenState;
}

export interface SeenOptions {
  /** Most ids remembered. Default 10000. */
  maxIds?: number;
  /** Kept this long past expiry, for copies already on their way. Default 60000. */
  marginMs?: number;
}

export class SeenIds {
  readonly maxIds: number;
  readonly marginMs: number;
  readonly #entries = new Map<string, Entry>();
  /** Local clock minus server clock, at most; +Infinity until a notification was seen. */
  #offsetMs = Number.POSITIVE_INFINITY;

  constructor(options: SeenOptions = {}) {
    this.maxIds = Math.max(1, options.maxIds ?? 10_000);
    this.marginMs = Math.max(0, options.marginMs ?? 60_000);
  }

  get size(): number {
    return this.#entries.size;
  }

  state(id: string): SeenState | undefined {
    return this.#entries.get(id)?.state;
  }

  /**
   * Records a received notification. Returns false if the id was already known (a duplicate,
   * which the caller must not show again, but must ack again).
   */
  add(id: string, expiresAtMs: number, publishedAtMs: number, nowMs: number): boolean {
    this.#offsetMs = Math.min(this.#offsetMs, nowMs - publishedAtMs);
    if (this.#entries.has(id)) return false;
    this.#entries.set(id, { expiresAtMs, state: "received" });
    if (this.#entries.size > this.maxIds) this.#evict(nowMs);
    return true;
  }

  /** Moves an id's state forward (received < acked < read); unknown ids are ignored. */
  mark(id: string, state: SeenState): void {
    const entry = this.#entries.get(id);
    if (entry === undefined) return;
    if (rank(state) > rank(entry.state)) entry.state = state;
  }

  /** Forgets ids whose message expired more than `marginMs` ago by the server's clock. */
  prune(nowMs: number): number {
    if (!Number.isFinite(this.#offsetMs)) return 0;
    const serverNow = nowMs - this.#offsetMs;
    let removed = 0;
    for (const [id, entry] of this.#entries) {
      if (entry.expiresAtMs + this.marginMs < serverNow) {
        this.#entries.delete(id);
        removed += 1;
      }
    }
    return removed;
  }

  /** Over the cap: prune, then drop the soonest-expiring tenth (a later copy of one of those
   * would be shown again; at the default cap that takes 10000 messages still live at once). */
  #evict(nowMs: number): void {
    this.prune(nowMs);
    if (this.#entries.size <= this.maxIds) return;
    const excess = this.#entries.size - Math.floor(this.maxIds * 0.9);
    const soonest = [...this.#entries].sort((a, b) => a[1].expiresAtMs - b[1].expiresAtMs).slice(0, excess);
    for (const [id] of soonest) this.#entries.delete(id);
  }
}

function rank(state: SeenState): number {
  return state === "received" ? 0 : state === "acked" ? 1 : 2;
}
