/**
 * DP-FedAvg on the aggregator, as central differential privacy with a
 * trusted aggregator. Every accepted update is clipped to an L2 norm C and
 * summed with weight 1. The round's mean is (sum + N(0, (z C)^2)) / m,
 * where m is the number of selected vehicles. A PrivacyBudget in
 * stateDir/privacy.json tracks epsilon across rounds and restarts.
 *
 * NOTE: the accountant assumes Poisson sampling with rate q, but the
 * runner selects a fixed number of the online vehicles and uses
 * q = selected / online. That is the usual approximation, not a proven
 * bound (see privacy/budget.ts).
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCode, FleetError } from '../protocol/index.ts';
import type { WeightMap } from '../models/architecture.ts';
import {
  PrivacyBudget,
  clipUpdate,
  computeNoisyMean,
  createGaussianSource,
} from '../privacy/index.ts';
import { writeFileAtomic } from './state.ts';

/** Settings of DP-FedAvg, the `differentialPrivacy` aggregator option. */
export interface DifferentialPrivacyOptions {
  /** C: every accepted update is scaled down to at most this L2 norm. */
  clipNorm: number;
  /** z: noise standard deviation on the sum over C. */
  noiseMultiplier: number;
  /** Rounds stop before epsilon at `delta` would exceed this. */
  targetEpsilon: number;
  /** delta of the (epsilon, delta) guarantee, in (0, 1). */
  delta: number;
  /**
   * Seed of the noise; round r draws from seed + r. Default: the
   * aggregator's seed. Ignored when noiseSource is 'crypto'.
   */
  seed?: number;
  /**
   * 'seeded' (default) makes runs repeatable, but anyone with the seed
   * can subtract the noise. Use 'crypto' (node:crypto) in production.
   */
  noiseSource?: 'seeded' | 'crypto';
}

/** DifferentialPrivacyOptions with defaults filled in. */
export type ResolvedDifferentialPrivacy = Required<DifferentialPrivacyOptions>;

const PRIVACY_FILE = 'privacy.json';

function invalidDp(field: string, value: unknown, expected: string): never {
  throw new FleetError(
    ErrorCode.InvalidConfig,
    `aggregator option differentialPrivacy.${field} is ${String(value)}, ` +
      `expected ${expected}`,
  );
}

function requirePositive(field: string, value: unknown): void {
  if (typeof value !== 'number' || !(value > 0) || !Number.isFinite(value)) {
    invalidDp(field, value, 'a positive finite number');
  }
}

/**
 * Checks the DP settings and fills in defaults.
 *
 * @throws {FleetError} INVALID_CONFIG naming the field, or when
 *   `aggregation` is not 'fedavg' (clipping and noise are calibrated to
 *   an unweighted mean, not to a robust rule).
 */
export function resolveDifferentialPrivacy(
  options: DifferentialPrivacyOptions,
  aggregation: string,
  defaultSeed: number,
): ResolvedDifferentialPrivacy {
  if (aggregation !== 'fedavg') {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `aggregator option differentialPrivacy needs aggregation fedavg, ` +
        `got ${aggregation}`,
    );
  }
  requirePositive('clipNorm', options.clipNorm);
  requirePositive('noiseMultiplier', options.noiseMultiplier);
  requirePositive('targetEpsilon', options.targetEpsilon);
  const { delta } = options;
  if (typeof delta !== 'number' || !(delta > 0 && delta < 1)) {
    invalidDp('delta', delta, 'a number in (0, 1)');
  }
  const seed = options.seed ?? defaultSeed;
  if (!Number.isSafeInteger(seed) || seed < 0) {
    invalidDp('seed', seed, 'an integer >= 0');
  }
  const noiseSource = options.noiseSource ?? 'seeded';
  if (noiseSource !== 'seeded' && noiseSource !== 'crypto') {
    invalidDp('noiseSource', noiseSource, "'seeded' or 'crypto'");
  }
  return { ...options, delta, seed, noiseSource };
}

/** Equal-weight float64 sum of clipped updates of one round. */
export class ClippedSum {
  readonly clipNorm: number;
  readonly #sums = new Map<string, Float64Array>();
  readonly #norms: number[] = [];

  constructor(tensorSizes: ReadonlyMap<string, number>, clipNorm: number) {
    this.clipNorm = clipNorm;
    for (const [name, size] of tensorSizes) {
      this.#sums.set(name, new Float64Array(size));
    }
  }

  /** Updates added so far. */
  get count(): number {
    return this.#norms.length;
  }

  /** Norms of the added updates before clipping, in arrival order. */
  get norms(): readonly number[] {
    return this.#norms;
  }

  /** Updates whose norm was above clipNorm. */
  get clippedCount(): number {
    return this.#norms.filter((norm) => norm > this.clipNorm).length;
  }

  /** Median norm before clipping, or undefined before any update. */
  get medianNorm(): number | undefined {
    if (this.#norms.length === 0) return undefined;
    const sorted = [...this.#norms].sort((a, b) => a - b);
    const middle = sorted.length >> 1;
    return sorted.length % 2 === 1
      ? sorted[middle]
      : (sorted[middle - 1] + sorted[middle]) / 2;
  }

  /** Clips `deltas` (already validated) to clipNorm and adds them. */
  add(deltas: ReadonlyMap<string, Float32Array>): void {
    const { clipped, norm } = clipUpdate(deltas, this.clipNorm);
    for (const [name, sum] of this.#sums) {
      const values = clipped.get(name)!;
      for (let i = 0; i < sum.length; i++) sum[i] += values[i];
    }
    this.#norms.push(norm);
  }

  /**
   * Returns (sum + N(0, (z C)^2)) / selectedCount on every value.
   *
   * @throws {FleetError} EMPTY_AGGREGATE when no update was added.
   */
  noisyMean(
    selectedCount: number,
    dp: ResolvedDifferentialPrivacy,
    round: number,
  ): WeightMap {
    if (this.count === 0) {
      throw new FleetError(
        ErrorCode.EmptyAggregate,
        `cannot average zero updates in DP round ${round}`,
      );
    }
    const sum: WeightMap = new Map();
    for (const [name, values] of this.#sums) {
      sum.set(name, Float32Array.from(values));
    }
    return noisyMeanOf(sum, selectedCount, dp, round);
  }
}

/**
 * DP-FedAvg's mean of an equal-weight sum of clipped updates: Gaussian
 * noise with standard deviation noiseMultiplier * clipNorm added to
 * `sum`, divided by the number of selected vehicles. Secure rounds call
 * it on their unmasked sum.
 */
export function noisyMeanOf(
  sum: WeightMap,
  selectedCount: number,
  dp: ResolvedDifferentialPrivacy,
  round: number,
): WeightMap {
  const normal = createGaussianSource(
    dp.noiseSource === 'crypto'
      ? { kind: 'crypto' }
      : { kind: 'seeded', seed: dp.seed + round },
  );
  return computeNoisyMean(
    sum,
    {
      noiseMultiplier: dp.noiseMultiplier,
      clipNorm: dp.clipNorm,
      expectedVehicles: selectedCount,
    },
    normal,
  );
}

/** Sampling rate of a round: selected / online vehicles, at most 1. */
export function samplingRateOf(selected: number, online: number): number {
  if (online <= 0) return 1;
  return Math.min(1, selected / online);
}

/** The run's PrivacyBudget, kept in stateDir/privacy.json. */
export class PrivacyAccountant {
  readonly settings: ResolvedDifferentialPrivacy;
  readonly #path: string;
  readonly #budget: PrivacyBudget;

  /**
   * Loads stateDir/privacy.json, or starts an empty budget.
   *
   * @throws {FleetError} INVALID_CONFIG when the file is not a budget.
   */
  constructor(stateDir: string, settings: ResolvedDifferentialPrivacy) {
    this.settings = settings;
    this.#path = join(stateDir, PRIVACY_FILE);
    this.#budget = existsSync(this.#path)
      ? this.#load()
      : new PrivacyBudget({ noiseMultiplier: settings.noiseMultiplier });
  }

  /** Rounds recorded so far, including those before a restart. */
  get rounds(): number {
    return this.#budget.rounds;
  }

  /** Epsilon at the configured delta after the recorded rounds. */
  get epsilon(): number {
    return this.#budget.epsilon(this.settings.delta);
  }

  /** True when one more round at `samplingRate` would pass the target. */
  wouldExceed(samplingRate: number): {
    exceeds: boolean;
    epsilonAfter: number;
  } {
    const { delta, targetEpsilon } = this.settings;
    const epsilonAfter = this.#budget.epsilonAfterStep(samplingRate, delta);
    return { exceeds: epsilonAfter > targetEpsilon, epsilonAfter };
  }

  /** Records one released round and writes privacy.json atomically. */
  step(samplingRate: number): number {
    this.#budget.step(samplingRate, this.settings.noiseMultiplier);
    const text = JSON.stringify(this.#budget.toJSON(), null, 2);
    writeFileAtomic(this.#path, `${text}\n`);
    return this.epsilon;
  }

  #load(): PrivacyBudget {
    try {
      return PrivacyBudget.fromJSON(
        JSON.parse(readFileSync(this.#path, 'utf8')),
      );
    } catch (err) {
      throw new FleetError(
        ErrorCode.InvalidConfig,
        `cannot read privacy budget ${this.#path}: ${(err as Error).message}`,
        { cause: err },
      );
    }
  }
}

/** The four DP command-line flags, parsed as numbers. */
export interface DpFlags {
  dpClipNorm?: number;
  dpNoiseMultiplier?: number;
  dpTargetEpsilon?: number;
  dpDelta?: number;
}

/**
 * Returns the differentialPrivacy option of the `--dp-*` flags, or
 * undefined when none is given.
 *
 * @throws {FleetError} INVALID_CONFIG when some but not all four are given.
 */
export function differentialPrivacyOfFlags(
  flags: DpFlags,
): DifferentialPrivacyOptions | undefined {
  const { dpClipNorm, dpNoiseMultiplier, dpTargetEpsilon, dpDelta } = flags;
  const values = [dpClipNorm, dpNoiseMultiplier, dpTargetEpsilon, dpDelta];
  const given = values.filter((value) => value !== undefined).length;
  if (given === 0) return undefined;
  if (given < values.length) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `differential privacy needs all four of --dp-clip-norm, ` +
        `--dp-noise-multiplier, --dp-target-epsilon and --dp-delta, got ` +
        `${given}`,
    );
  }
  return {
    clipNorm: dpClipNorm!,
    noiseMultiplier: dpNoiseMultiplier!,
    targetEpsilon: dpTargetEpsilon!,
    delta: dpDelta!,
  };
}
