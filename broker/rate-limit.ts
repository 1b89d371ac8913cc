/** Per-client publish limits. */

/** Limits of one client role. */
export interface ClientLimits {
  /** Largest PUBLISH payload, in bytes. */
  maxMessageBytes: number;
  /** Sustained publishes per second (the token bucket's refill rate). */
  publishesPerSecond: number;
  /** Publishes allowed in a burst (the token bucket's capacity). */
  publishBurst: number;
}

/**
 * Token bucket: holds up to `capacity` tokens, refills `ratePerSecond`
 * tokens per second and starts full. Each publish takes one token.
 */
export class TokenBucket {
  readonly capacity: number;
  readonly ratePerSecond: number;
  #tokens: number;
  #updatedAtMs: number;
  readonly #now: () => number;

  /**
   * @param now clock in milliseconds; tests pass a fake one.
   * @throws {RangeError} for a capacity below 1 or a negative or
   *   non-finite rate.
   */
  constructor(
    capacity: number,
    ratePerSecond: number,
    now: () => number = performance.now.bind(performance),
  ) {
    if (!Number.isFinite(capacity) || capacity < 1) {
      throw new RangeError(`capacity must be >= 1, got ${capacity}`);
    }
    if (!Number.isFinite(ratePerSecond) || ratePerSecond < 0) {
      throw new RangeError(
        `ratePerSecond must be a finite number >= 0, got ${ratePerSecond}`,
      );
    }
    this.capacity = capacity;
    this.ratePerSecond = ratePerSecond;
    this.#now = now;
    this.#tokens = capacity;
    this.#updatedAtMs = now();
  }

  /** Takes one token; returns false, taking nothing, when none is left. */
  tryTake(): boolean {
    const now = this.#now();
    const refill = ((now - this.#updatedAtMs) / 1000) * this.ratePerSecond;
    this.#tokens = Math.min(this.capacity, this.#tokens + refill);
    this.#updatedAtMs = now;
    if (this.#tokens < 1) return false;
    this.#tokens -= 1;
    return true;
  }
}

/**
 * Checks the limits of one role.
 *
 * @throws {RangeError} naming the role and the value out of range.
 */
export function checkClientLimits(role: string, limits: ClientLimits): void {
  const { maxMessageBytes, publishesPerSecond, publishBurst } = limits;
  if (!Number.isSafeInteger(maxMessageBytes) || maxMessageBytes < 1) {
    throw new RangeError(
      `${role} maxMessageBytes must be a positive integer, got ` +
        String(maxMessageBytes),
    );
  }
  if (!(publishesPerSecond > 0) || !Number.isFinite(publishesPerSecond)) {
    throw new RangeError(
      `${role} publishesPerSecond must be a positive number, got ` +
        String(publishesPerSecond),
    );
  }
  if (!Number.isSafeInteger(publishBurst) || publishBurst < 1) {
    throw new RangeError(
      `${role} publishBurst must be a positive integer, got ` +
        String(publishBurst),
    );
  }
}
