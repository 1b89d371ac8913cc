/** Log lines of a new round at the depot. */
import type { Logger } from '../../protocol/index.ts';
import type { DepotRound } from './collector.ts';

/**
 * Logs a new round task at info, and what the depot cannot do in it at
 * error or warn: tensors this model lacks, secure aggregation, and a
 * forward margin at least as long as the round.
 */
export function logRoundStart(
  log: Logger,
  round: DepotRound,
  start: { restored: number; removed: number[]; forwardMarginMs: number },
): void {
  const { restored, removed, forwardMarginMs } = start;
  const { task } = round;
  const fields = {
    round: task.round,
    modelVersion: task.modelVersion,
    selected: task.selectedVehicles.length,
    deadlineMs: task.deadlineMs,
    restoredUpdates: restored,
    phase: round.phase,
    removedRounds: removed.length === 0 ? undefined : removed,
  };
  log.info(fields, 'round task received');
  if (round.unknownTensors.length > 0) {
    log.error(
      { round: task.round, tensors: round.unknownTensors },
      'round task names tensors this model does not have',
    );
  }
  if (task.secureAggregation) {
    log.error(
      { round: task.round },
      'secure aggregation rounds are not supported through a depot',
    );
  }
  if (task.deadlineMs - task.openedAtMs <= forwardMarginMs) {
    log.warn(
      { round: task.round, forwardMarginMs },
      'forward margin is not shorter than the round, the first accepted ' +
        'update forwards the partial',
    );
  }
}
