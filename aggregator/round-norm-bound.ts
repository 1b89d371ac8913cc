/**
 * Norm bound of real rounds: the `normBound` aggregator option, and the
 * step that clips or drops a closed round's updates whose L2 norm is far
 * above the round's median (see strategies/norm-bound.ts) before the
 * aggregation rule runs.
 *
 * The bound needs every update of the round, so the round keeps them
 * (OpenRound keepUpdates), which costs n x the trainable tensors' size in
 * memory. Updates were acked as accepted on arrival, because the median
 * is known only at the close: a dropped update is logged and counted in
 * the 'round-closed' event, but its vehicle gets no second ack.
 */
import { ErrorCode, FleetError, type Logger } from '../protocol/index.ts';
import type { WeightMap } from '../models/architecture.ts';
import type { RoundNormBound } from './events.ts';
import { FedAvgAccumulator } from './fedavg.ts';
import type { OpenRound } from './round.ts';
import {
  applyNormBound,
  type NormBoundOptions,
  type VehicleUpdate,
} from './strategies/index.ts';

/** Actions of a norm bound, as the flag and option take them. */
export const NORM_BOUND_ACTIONS = ['clip', 'reject'] as const;

function invalid(field: string, value: unknown, expected: string): never {
  throw new FleetError(
    ErrorCode.InvalidConfig,
    `aggregator option normBound.${field} is ${String(value)}, ` +
      `expected ${expected}`,
  );
}

function isAtLeast(
  value: unknown,
  min: number,
  isMinAllowed: boolean,
): boolean {
  if (typeof value !== 'number' || !Number.isFinite(value)) return false;
  return isMinAllowed ? value >= min : value > min;
}

/**
 * Checks the option against the rest of the configuration.
 *
 * Secure aggregation is rejected because the aggregator receives only the
 * round's sum, never one update, and its vehicles already clip to
 * secureAggregation.clipNorm before masking. Differential privacy is
 * rejected because a bound relative to the median makes the clip of each
 * update depend on the other updates, so one vehicle can move the sum by
 * more than the DP clip norm C, which the accountant assumes. DP-FedAvg
 * already clips every update to C.
 *
 * @throws {FleetError} INVALID_CONFIG naming the field or the option
 *   that cannot be combined with it.
 */
export function resolveNormBound(
  options: NormBoundOptions,
  context: { hasSecureAggregation: boolean; hasDifferentialPrivacy: boolean },
): NormBoundOptions {
  const { action, medianFactor, maxNorm } = options;
  if (!NORM_BOUND_ACTIONS.includes(action)) {
    invalid('action', action, `one of ${NORM_BOUND_ACTIONS.join(', ')}`);
  }
  if (medianFactor === undefined && maxNorm === undefined) {
    invalid('medianFactor', medianFactor, 'a number > 0, or a maxNorm');
  }
  if (medianFactor !== undefined && !isAtLeast(medianFactor, 0, false)) {
    invalid('medianFactor', medianFactor, 'a finite number > 0');
  }
  if (maxNorm !== undefined && !isAtLeast(maxNorm, 0, true)) {
    invalid('maxNorm', maxNorm, 'a finite number >= 0');
  }
  if (context.hasSecureAggregation) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      'aggregator option normBound cannot be combined with ' +
        'secureAggregation: the aggregator receives only the masked sum, never ' +
        'one update. Vehicles in secure rounds clip to ' +
        'secureAggregation.clipNorm before masking.',
    );
  }
  if (context.hasDifferentialPrivacy) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      'aggregator option normBound cannot be combined with ' +
        'differentialPrivacy: a bound relative to the round median lets ' +
        'one update change how the others are clipped, which the privacy ' +
        'accounting does not cover. DP already clips every update to ' +
        'differentialPrivacy.clipNorm.',
    );
  }
  return { action, medianFactor, maxNorm };
}

/** Flags of addNormBoundOptions, as commander parses them. */
export interface NormBoundFlags {
  normBoundMultiple?: number;
  normBoundMax?: number;
  normBoundAction?: string;
}

/**
 * Returns the normBound option of the `--norm-bound-*` flags, or
 * undefined without --norm-bound-multiple and --norm-bound-max. The
 * action defaults to 'clip', which keeps an honest vehicle's outlier
 * update at the bound instead of dropping it.
 *
 * @throws {FleetError} INVALID_CONFIG for --norm-bound-action alone.
 */
export function normBoundOfFlags(
  flags: NormBoundFlags,
): NormBoundOptions | undefined {
  const { normBoundMultiple, normBoundMax, normBoundAction } = flags;
  if (normBoundMultiple === undefined && normBoundMax === undefined) {
    if (normBoundAction !== undefined) {
      throw new FleetError(
        ErrorCode.InvalidConfig,
        '--norm-bound-action needs --norm-bound-multiple or --norm-bound-max',
      );
    }
    return undefined;
  }
  return {
    action: (normBoundAction ?? 'clip') as NormBoundOptions['action'],
    medianFactor: normBoundMultiple,
    maxNorm: normBoundMax,
  };
}

/** Updates of a closed round after the norm bound. */
export interface BoundedUpdates {
  /** Accepted and clipped updates, in vehicle id order. */
  updates: VehicleUpdate[];
  summary: RoundNormBound;
}

/**
 * Applies `options.normBound` to the updates `round` kept, and logs each
 * update it clips or drops with its vehicle id, norm and the bound.
 * Returns undefined without a norm bound.
 *
 * @throws {FleetError} QUORUM_NOT_MET when fewer than minUpdates updates
 *   remain.
 * @throws {Error} when the round kept no updates (opened without
 *   keepUpdates).
 */
export function boundRoundUpdates(
  round: OpenRound,
  options: { normBound?: NormBoundOptions; minUpdates: number },
  log: Logger,
): BoundedUpdates | undefined {
  const { normBound } = options;
  if (normBound === undefined) return undefined;
  const keptUpdates = round.keptUpdates;
  if (keptUpdates === undefined) {
    throw new Error(
      `round ${round.round} kept no updates, which the norm bound needs; ` +
        'open it with keepUpdates',
    );
  }
  // No updates: commitRound fails the round on its quorum.
  if (keptUpdates.length === 0) {
    return { updates: [], summary: summarize(normBound.action, [], []) };
  }

  const result = applyNormBound(keptUpdates, normBound);
  const byVehicle = new Map(
    keptUpdates.map((update) => [update.vehicleId, update]),
  );
  const updates: VehicleUpdate[] = [];
  const rejected: string[] = [];
  const clipped: string[] = [];
  for (const decision of result.decisions) {
    const { vehicleId } = decision;
    const fields = {
      round: round.round,
      vehicleId,
      norm: decision.norm,
      bound: result.bound,
      medianNorm: result.medianNorm,
    };
    if (decision.outcome === 'rejected') {
      rejected.push(vehicleId);
      log.warn(
        { ...fields, code: decision.reasonCode },
        'update dropped by norm bound',
      );
      continue;
    }
    if (decision.outcome === 'clipped') {
      clipped.push(vehicleId);
      log.warn(
        { ...fields, scale: decision.scale },
        'update clipped by norm bound',
      );
    }
    const { numExamples } = byVehicle.get(vehicleId)!;
    updates.push({ vehicleId, numExamples, deltas: decision.deltas });
  }

  if (updates.length < options.minUpdates) {
    throw new FleetError(
      ErrorCode.QuorumNotMet,
      `round ${round.round} has ${updates.length} updates within the norm ` +
        `bound ${result.bound} (${rejected.length} dropped), below the ` +
        `quorum of ${options.minUpdates}`,
    );
  }
  const summary = summarize(normBound.action, rejected, clipped);
  return {
    updates,
    summary: { ...summary, medianNorm: result.medianNorm, bound: result.bound },
  };
}

function summarize(
  action: NormBoundOptions['action'],
  rejected: string[],
  clipped: string[],
): RoundNormBound {
  return {
    action,
    medianNorm: undefined,
    bound: undefined,
    rejected: rejected.length,
    clipped: clipped.length,
    rejectedVehicleIds: rejected,
    clippedVehicleIds: clipped,
  };
}

/**
 * Returns the FedAvg mean of `updates`, weighted by numExamples, with the
 * exact sums of FedAvgAccumulator, so that a round where the bound changed
 * nothing gives the same bytes as streaming FedAvg.
 *
 * @throws {FleetError} EMPTY_AGGREGATE for no updates.
 */
export function averageUpdates(updates: readonly VehicleUpdate[]): WeightMap {
  if (updates.length === 0) {
    throw new FleetError(
      ErrorCode.EmptyAggregate,
      'cannot average zero updates: the norm bound left none',
    );
  }
  const tensorSizes = new Map<string, number>();
  for (const [name, values] of updates[0].deltas) {
    tensorSizes.set(name, values.length);
  }
  const accumulator = new FedAvgAccumulator(tensorSizes);
  for (const { deltas, numExamples } of updates) {
    accumulator.queue(deltas, numExamples);
  }
  return accumulator.result();
}
