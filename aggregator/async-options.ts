/**
 * Options of the asynchronous mode (FedBuff, Nguyen et al., AISTATS 2022).
 * The aggregator steps the model after every `bufferSize` accepted
 * updates, whatever round they were trained for. An update trained from
 * an older model version is weighted down by its staleness.
 */
import { ErrorCode, FleetError } from '../protocol/index.ts';

/** Asynchronous mode settings of the aggregator. */
export interface AsyncBufferOptions {
  /** Accepted updates per model step, K. */
  bufferSize: number;
  /**
   * Largest version lag an update may have: an update trained from
   * version v is accepted while the model is at most at v + maxStaleness.
   * Default 4.
   */
  maxStaleness?: number;
  /**
   * Exponent a of the staleness weight (1 + lag)^-a. Default 0.5, the
   * polynomial weight of the FedBuff paper.
   */
  stalenessExponent?: number;
}

export interface ResolvedAsyncBuffer {
  bufferSize: number;
  maxStaleness: number;
  stalenessExponent: number;
}

/**
 * Integer weights of the FedAvg sums are numExamples * staleness weight
 * times this factor, rounded, so that a weight below 1 keeps 6 bits.
 */
export const STALENESS_WEIGHT_SCALE = 64;

function invalid(option: string, value: unknown, expected: string): never {
  throw new FleetError(
    ErrorCode.InvalidConfig,
    `aggregator option asyncBuffer.${option} is ${String(value)}, ` +
      `expected ${expected}`,
  );
}

/**
 * Checks the options against the rest of the configuration.
 *
 * @throws {FleetError} INVALID_CONFIG for a bad value, for an aggregation
 *   rule other than fedavg, for differential privacy, secure aggregation
 *   or a norm bound (all need a fixed set of vehicles per round, which an
 *   open buffer has not), or for a maxExamplesPerUpdate whose scaled
 *   weight would not fit.
 */
export function resolveAsyncBuffer(
  options: AsyncBufferOptions,
  context: {
    aggregation: string;
    minUpdates: number;
    maxExamplesPerUpdate: number;
    differentialPrivacy?: unknown;
    secureAggregation?: unknown;
    normBound?: unknown;
  },
): ResolvedAsyncBuffer {
  const { bufferSize } = options;

  if (!Number.isSafeInteger(bufferSize) || bufferSize < 1) {
    invalid('bufferSize', bufferSize, 'an integer >= 1');
  }
  const maxStaleness = options.maxStaleness ?? 4;
  if (!Number.isSafeInteger(maxStaleness) || maxStaleness < 0) {
    invalid('maxStaleness', maxStaleness, 'an integer >= 0');
  }
  const stalenessExponent = options.stalenessExponent ?? 0.5;
  if (!(stalenessExponent >= 0) || !Number.isFinite(stalenessExponent)) {
    invalid('stalenessExponent', stalenessExponent, 'a number >= 0');
  }

  const conflicts: string[] = [];
  if (context.aggregation !== 'fedavg') {
    conflicts.push(`aggregation ${context.aggregation}`);
  }
  if (context.differentialPrivacy !== undefined) {
    conflicts.push('differentialPrivacy');
  }
  if (context.secureAggregation !== undefined) {
    conflicts.push('secureAggregation');
  }
  if (context.normBound !== undefined) conflicts.push('normBound');
  if (conflicts.length > 0) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `aggregator option asyncBuffer cannot be combined with ` +
        `${conflicts.join(', ')}; it needs aggregation fedavg without ` +
        'differential privacy, secure aggregation or a norm bound',
    );
  }
  if (context.minUpdates > bufferSize) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `aggregator option minUpdates is ${context.minUpdates}, above ` +
        `asyncBuffer.bufferSize ${bufferSize}; a buffer could never step`,
    );
  }

  const maxWeighted = 2 ** 26 / STALENESS_WEIGHT_SCALE;
  if (context.maxExamplesPerUpdate > maxWeighted) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `aggregator option maxExamplesPerUpdate is ` +
        `${context.maxExamplesPerUpdate}, above ${maxWeighted}, the most ` +
        'the asynchronous mode can weight exactly',
    );
  }
  return { bufferSize, maxStaleness, stalenessExponent };
}

/** Returns the staleness weight (1 + lag)^-a of an update `lag` versions old. */
export function stalenessWeight(lag: number, exponent: number): number {
  return (1 + lag) ** -exponent;
}
