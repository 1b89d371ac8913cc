/**
 * Privacy budget of a DP-FedAvg training run: the RDP of every round so
 * far, summed per order, and the (epsilon, delta) guarantee it gives.
 *
 * NOTE: the accountant assumes Poisson sampling, where each vehicle joins
 * a round independently with probability q. Selecting exactly k of N
 * vehicles is sampling without replacement, for which q = k / N is the
 * usual approximation but not a proven bound under add-or-remove
 * adjacency. For the guarantee to hold as stated, select each vehicle
 * independently with probability q and divide by the fixed q N.
 */
import {
  checkMechanism,
  checkOrders,
  computeRdp,
  DEFAULT_RDP_ORDERS,
} from './rdp.ts';
import { convertRdpToEpsilon } from './rdp-conversion.ts';
import type { PrivacySpent, RdpConversion } from './rdp-conversion.ts';

/** Settings of a PrivacyBudget. */
export interface PrivacyBudgetOptions {
  /** z, noise standard deviation over the clipping norm, > 0. */
  noiseMultiplier: number;
  /** RDP orders to track, DEFAULT_RDP_ORDERS when omitted. */
  orders?: readonly number[];
  /** RDP to (epsilon, delta) rule, 'tight' when omitted. */
  conversion?: RdpConversion;
}

/** JSON form of a PrivacyBudget, for restarts. */
export interface PrivacyBudgetState {
  version: 1;
  noiseMultiplier: number;
  conversion: RdpConversion;
  orders: number[];
  /** Summed RDP per order. null is Infinity, which JSON cannot represent. */
  rdp: (number | null)[];
  rounds: number;
}

/** Per-step RDP curves kept for reuse, because fleets repeat a few rates. */
const MAX_CACHED_CURVES = 64;

function checkNoiseMultiplier(noiseMultiplier: number): void {
  if (!(noiseMultiplier > 0) || !Number.isFinite(noiseMultiplier)) {
    throw new RangeError(
      `noise multiplier of a privacy budget must be a positive finite ` +
        `number, got ${noiseMultiplier}`,
    );
  }
}

function checkDelta(delta: number): void {
  if (!(delta > 0 && delta < 1)) {
    throw new RangeError(`delta must be in (0, 1), got ${delta}`);
  }
}

/** Tracks the privacy spent by the rounds of one training run. */
export class PrivacyBudget {
  readonly noiseMultiplier: number;
  readonly orders: readonly number[];
  readonly conversion: RdpConversion;
  readonly #rdp: number[];
  readonly #curves = new Map<string, readonly number[]>();
  #rounds = 0;

  /**
   * @throws {RangeError} when the noise multiplier is not positive and
   *   finite, or an order is out of range (see checkOrders).
   */
  constructor(options: PrivacyBudgetOptions) {
    checkNoiseMultiplier(options.noiseMultiplier);
    const orders = options.orders ?? DEFAULT_RDP_ORDERS;
    checkOrders(orders);
    const conversion = options.conversion ?? 'tight';
    if (conversion !== 'tight' && conversion !== 'standard') {
      throw new RangeError(
        `conversion must be 'tight' or 'standard', got ${String(conversion)}`,
      );
    }

    this.noiseMultiplier = options.noiseMultiplier;
    this.orders = Object.freeze([...orders]);
    this.conversion = conversion;
    this.#rdp = new Array<number>(orders.length).fill(0);
  }

  /** Number of rounds recorded by step(). */
  get rounds(): number {
    return this.#rounds;
  }

  /** Summed RDP at each of `orders`, as a copy. */
  get rdp(): number[] {
    return [...this.#rdp];
  }

  /**
   * Records one round in which each vehicle took part with probability
   * `samplingRate` (selected / fleet size).
   *
   * @param noiseMultiplier z of this round, the budget's own by default.
   * @throws {RangeError} when the rate is outside [0, 1] or z is not
   *   positive and finite.
   */
  step(samplingRate: number, noiseMultiplier = this.noiseMultiplier): void {
    const curve = this.#stepCurve(samplingRate, noiseMultiplier);
    for (let i = 0; i < curve.length; i++) this.#rdp[i] += curve[i];
    this.#rounds += 1;
  }

  /**
   * Returns the (epsilon, delta) guarantee of the rounds so far.
   *
   * @throws {RangeError} when delta is outside (0, 1).
   */
  spent(delta: number): PrivacySpent {
    checkDelta(delta);
    return convertRdpToEpsilon(this.orders, this.#rdp, delta, this.conversion);
  }

  /** Returns epsilon at `delta` after the rounds so far (0 before any). */
  epsilon(delta: number): number {
    return this.spent(delta).epsilon;
  }

  /**
   * Returns epsilon at `delta` if one more round at `samplingRate` ran,
   * without recording it, so a caller can stop before overshooting.
   */
  epsilonAfterStep(
    samplingRate: number,
    delta: number,
    noiseMultiplier = this.noiseMultiplier,
  ): number {
    checkDelta(delta);
    const curve = this.#stepCurve(samplingRate, noiseMultiplier);
    const next = this.#rdp.map((value, i) => value + curve[i]);
    return convertRdpToEpsilon(this.orders, next, delta, this.conversion)
      .epsilon;
  }

  /**
   * Returns true when the rounds so far have spent `targetEpsilon` at
   * `delta`, that is epsilon(delta) >= targetEpsilon.
   *
   * @throws {RangeError} when targetEpsilon is not positive and finite, or
   *   delta is outside (0, 1).
   */
  isExhausted(targetEpsilon: number, delta: number): boolean {
    if (!(targetEpsilon > 0) || !Number.isFinite(targetEpsilon)) {
      throw new RangeError(
        `target epsilon must be a positive finite number, got ${targetEpsilon}`,
      );
    }
    return this.epsilon(delta) >= targetEpsilon;
  }

  /** Returns the state as plain JSON data. */
  toJSON(): PrivacyBudgetState {
    return {
      version: 1,
      noiseMultiplier: this.noiseMultiplier,
      conversion: this.conversion,
      orders: [...this.orders],
      rdp: this.#rdp.map((value) => (Number.isFinite(value) ? value : null)),
      rounds: this.#rounds,
    };
  }

  /**
   * Restores a budget saved with toJSON().
   *
   * @throws {TypeError} when `state` does not have the PrivacyBudgetState
   *   shape.
   * @throws {RangeError} when a value in it is out of range.
   */
  static fromJSON(state: unknown): PrivacyBudget {
    const checked = checkState(state);
    const budget = new PrivacyBudget({
      noiseMultiplier: checked.noiseMultiplier,
      orders: checked.orders,
      conversion: checked.conversion,
    });
    checked.rdp.forEach((value, i) => {
      budget.#rdp[i] = value ?? Infinity;
    });
    budget.#rounds = checked.rounds;
    return budget;
  }

  #stepCurve(samplingRate: number, noiseMultiplier: number): readonly number[] {
    checkMechanism(samplingRate, noiseMultiplier);
    checkNoiseMultiplier(noiseMultiplier);
    const key = `${samplingRate}:${noiseMultiplier}`;
    let curve = this.#curves.get(key);
    if (curve === undefined) {
      curve = computeRdp(samplingRate, noiseMultiplier, 1, this.orders);
      if (this.#curves.size >= MAX_CACHED_CURVES) this.#curves.clear();
      this.#curves.set(key, curve);
    }
    return curve;
  }
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Checks the shape and values of a saved PrivacyBudgetState. */
function checkState(state: unknown): PrivacyBudgetState {
  if (!isRecord(state) || state.version !== 1) {
    throw new TypeError(
      'privacy budget state must be an object with version 1, as written ' +
        'by PrivacyBudget.toJSON()',
    );
  }
  const { orders, rdp, rounds, noiseMultiplier, conversion } = state;
  if (
    !Array.isArray(orders) ||
    !orders.every((order) => typeof order === 'number') ||
    !Array.isArray(rdp) ||
    rdp.length !== orders.length ||
    typeof noiseMultiplier !== 'number' ||
    typeof rounds !== 'number' ||
    (conversion !== 'tight' && conversion !== 'standard')
  ) {
    throw new TypeError(
      'privacy budget state needs numeric orders, an rdp list of the same ' +
        'length, numeric noiseMultiplier and rounds, and conversion ' +
        "'tight' or 'standard'",
    );
  }
  for (const value of rdp) {
    if (value !== null && !(typeof value === 'number' && value >= 0)) {
      throw new RangeError(
        `privacy budget state rdp values must be numbers >= 0 or null, ` +
          `got ${String(value)}`,
      );
    }
  }
  if (!Number.isSafeInteger(rounds) || rounds < 0) {
    throw new RangeError(
      `privacy budget state rounds must be an integer >= 0, got ${rounds}`,
    );
  }
  return state as unknown as PrivacyBudgetState;
}
