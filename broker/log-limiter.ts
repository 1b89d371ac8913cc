/**
 * Limits repeated log lines. A rejected client retries every few seconds
 * (the agent every 2 s), and each attempt would log the same warning.
 */
export class RepeatedLogLimiter {
  readonly intervalMs: number;
  readonly #now: () => number;
  readonly #entries = new Map<
    string,
    { loggedAtMs: number; skipped: number }
  >();

  /** Keys kept before entries older than the interval are dropped. */
  static readonly MAX_KEYS = 10_000;

  /**
   * @param intervalMs minimum time between two lines of one key.
   * @param now clock in milliseconds; tests pass a fake one.
   */
  constructor(intervalMs = 30_000, now: () => number = Date.now) {
    this.intervalMs = intervalMs;
    this.#now = now;
  }

  /**
   * Returns undefined when a line for `key` was logged within the interval,
   * and otherwise the number of lines skipped since the last one, which
   * the caller logs as `skipped`.
   */
  admit(key: string): number | undefined {
    const now = this.#now();
    const entry = this.#entries.get(key);
    if (entry !== undefined && now - entry.loggedAtMs < this.intervalMs) {
      entry.skipped += 1;
      return undefined;
    }
    if (this.#entries.size >= RepeatedLogLimiter.MAX_KEYS) this.#prune(now);
    // A flood of distinct keys within one interval: forget them all
    // rather than grow without bound.
    if (this.#entries.size >= RepeatedLogLimiter.MAX_KEYS) {
      this.#entries.clear();
    }
    this.#entries.set(key, { loggedAtMs: now, skipped: 0 });
    return entry?.skipped ?? 0;
  }

  #prune(now: number): void {
    for (const [key, entry] of this.#entries) {
      if (now - entry.loggedAtMs >= this.intervalMs) this.#entries.delete(key);
    }
  }
}
