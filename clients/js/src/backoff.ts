/**
 * The reconnect schedule of proto/README.md ("Reconnecting"): start at 250 ms, double after each
 * failed attempt up to 10 s, wait a random time between half and one and a half times the current
 * step, and start again from the bottom once a connection has received `hello`.
 */

export interface BackoffOptions {
  /** First step, in ms. Default 250. */
  initialMs?: number;
  /** Largest step, in ms. Default 10000. */
  maxMs?: number;
}

export class Backoff {
  readonly initialMs: number;
  readonly maxMs: number;
  #step: number;
  readonly #random: () => number;

  constructor(options: BackoffOptions = {}, random: () => number = Math.random) {
    this.initialMs = Math.max(1, options.initialMs ?? 250);
    this.maxMs = Math.max(this.initialMs, options.maxMs ?? 10_000);
    this.#step = this.initialMs;
    this.#random = random;
  }

  /** The current step, before jitter. */
  get step(): number {
    return this.#step;
  }

  /** The delay before the next attempt; doubles the step for the one after. */
  next(): number {
    const delay = this.#step * (0.5 + this.#random());
    this.#step = Math.min(this.#step * 2, this.maxMs);
    return Math.round(delay);
  }

  /** Raises the step to at least `ms` (for closes that ask for a longer pause). */
  atLeast(ms: number): void {
    this.#step = Math.min(Math.max(this.#step, ms), this.maxMs);
  }

  /** After a `hello`: the next failure waits the shortest step again. */
  reset(): void {
    this.#step = this.initialMs;
  }
}
