/**
 * Options of secure aggregation rounds and the per-round configuration the
 * round task carries (see aggregator/secure-round.ts).
 */
import {
  ErrorCode,
  FleetError,
  type SecureAggregationConfig,
} from '../protocol/index.ts';
import {
  CompressionKind,
  compressionNameOf,
} from '../protocol/compression/index.ts';
import { MAX_TIMER_MS } from '../protocol/mqtt-end.ts';
import type { ResolvedDifferentialPrivacy } from './privacy-round.ts';

/** Secure aggregation settings of the aggregator. */
export interface SecureAggregationOptions {
  /**
   * L2 norm each vehicle clips its delta to before masking. Default 10.
   * With differential privacy the DP clip norm is used instead.
   */
  clipNorm?: number;
  /**
   * Share of the vehicles that key sharing must keep, above which a
   * secret can be rebuilt: threshold t = max(2, floor(n * fraction) + 1)
   * for n vehicles with keys. Default 0.5, so a majority is needed and
   * fewer than half may drop out after sharing keys.
   */
  thresholdFraction?: number;
  /**
   * Time each of the key, share and unmask phases waits for vehicles
   * before it goes on without them. Default 30,000 ms.
   */
  phaseTimeoutMs?: number;
}

/** Options with defaults, checked. */
export interface ResolvedSecureAggregation {
  clipNorm: number;
  thresholdFraction: number;
  phaseTimeoutMs: number;
  /** Equal weights: true with differential privacy. */
  equalWeights: boolean;
}

function invalid(option: string, value: unknown, expected: string): never {
  throw new FleetError(
    ErrorCode.InvalidConfig,
    `aggregator option secureAggregation.${option} is ${String(value)}, ` +
      `expected ${expected}`,
  );
}

/**
 * Checks the options against the rest of the configuration.
 *
 * @throws {FleetError} INVALID_CONFIG for a bad value, an aggregation rule
 *   other than fedavg (the robust rules need each update in the clear),
 *   or a quorum below 2.
 */
export function resolveSecureAggregation(
  options: SecureAggregationOptions,
  context: {
    aggregation: string;
    minUpdates: number;
    differentialPrivacy?: Pick<ResolvedDifferentialPrivacy, 'clipNorm'>;
    updateCompression?: { kind: number };
  },
): ResolvedSecureAggregation {
  if (context.aggregation !== 'fedavg') {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      'aggregator option secureAggregation needs aggregation fedavg, got ' +
        `${context.aggregation}; the robust rules need every update in ` +
        'the clear',
    );
  }
  const compression = context.updateCompression?.kind ?? 0;
  if (
    compression !== CompressionKind.Unspecified &&
    compression !== CompressionKind.Float32
  ) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      'aggregator option secureAggregation cannot be combined with ' +
        `updateCompression ${compressionNameOf(compression)}; masked ` +
        'inputs are 32-bit words whatever the encoding',
    );
  }
  if (context.minUpdates < 2) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `aggregator option minUpdates is ${context.minUpdates}, expected at ` +
        'least 2 with secure aggregation, whose threshold is at least 2',
    );
  }
  const dp = context.differentialPrivacy;
  if (
    dp !== undefined &&
    options.clipNorm !== undefined &&
    options.clipNorm !== dp.clipNorm
  ) {
    invalid(
      'clipNorm',
      options.clipNorm,
      `no value with differential privacy, whose clip norm ${dp.clipNorm} ` +
        'the vehicles use',
    );
  }
  const clipNorm = dp?.clipNorm ?? options.clipNorm ?? 10;
  if (!(clipNorm > 0) || !Number.isFinite(clipNorm)) {
    invalid('clipNorm', clipNorm, 'a positive number');
  }
  const thresholdFraction = options.thresholdFraction ?? 0.5;
  if (!(thresholdFraction >= 0 && thresholdFraction < 1)) {
    invalid('thresholdFraction', thresholdFraction, 'a number in [0, 1)');
  }
  const phaseTimeoutMs = options.phaseTimeoutMs ?? 30_000;
  if (
    !Number.isSafeInteger(phaseTimeoutMs) ||
    phaseTimeoutMs < 1 ||
    phaseTimeoutMs > MAX_TIMER_MS
  ) {
    invalid(
      'phaseTimeoutMs',
      phaseTimeoutMs,
      `an integer from 1 to ${MAX_TIMER_MS} ms`,
    );
  }
  return {
    clipNorm,
    thresholdFraction,
    phaseTimeoutMs,
    equalWeights: dp !== undefined,
  };
}

/** Returns the Shamir threshold for `vehicleCount` vehicles. */
export function thresholdFor(
  vehicleCount: number,
  settings: Pick<ResolvedSecureAggregation, 'thresholdFraction'>,
): number {
  return Math.max(2, Math.floor(vehicleCount * settings.thresholdFraction) + 1);
}

/**
 * Returns the round task's configuration for `selected` vehicles. The example cap
 * is the largest numExamples the selected vehicles reported, so that the
 * largest vehicle has weight 1 and small weights do not drown in the
 * quantization step.
 */
export function secureConfigFor(
  selected: readonly string[],
  settings: ResolvedSecureAggregation,
  tensorNames: readonly string[],
  examplesOf: (vehicleId: string) => number | undefined,
  maxExamplesPerUpdate: number,
): SecureAggregationConfig {
  let exampleCap = 0;
  if (!settings.equalWeights) {
    const reported = selected
      .map(examplesOf)
      .filter((count): count is number => count !== undefined);
    exampleCap =
      reported.length > 0 ? Math.max(...reported) : maxExamplesPerUpdate;
  }
  return {
    threshold: thresholdFor(selected.length, settings),
    clipNorm: settings.clipNorm,
    exampleCap,
    maxVehicles: selected.length,
    tensorNames: [...tensorNames],
  };
}
