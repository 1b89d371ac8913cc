/** Builders of the messages the aggregator publishes. Pure functions. */
import {
  AckStatus,
  type RoundTask,
  type UpdateAck,
} from '../protocol/index.ts';
import type { ResolvedOptions } from './options.ts';
import type { OpenRound } from './round.ts';
import type { UpdateDecision } from './validate.ts';

/**
 * Update id of acks for payloads that did not decode. The ack codec needs
 * a non-empty id, and the vehicle's real one is unknown.
 */
export const UNKNOWN_UPDATE_ID = 'unknown';

/** Maximum length of a reason text sent to a vehicle or logged. */
const MAX_REASON_CHARS = 500;

/** Cuts `text` to `maxChars`, marking the cut, for logs and acks. */
export function truncateText(
  text: string,
  maxChars = MAX_REASON_CHARS,
): string {
  return text.length <= maxChars ? text : `${text.slice(0, maxChars - 3)}...`;
}

/** Builds the RoundTask of `round` for a model with `modelSha256`. */
export function buildRoundTask(
  round: OpenRound,
  options: ResolvedOptions,
  modelName: string,
  modelSha256: string,
): RoundTask {
  return {
    fleetId: options.fleetId,
    round: round.round,
    modelName,
    modelVersion: round.baseModelVersion,
    selectedVehicles: [...round.selected],
    training: {
      localEpochs: options.localEpochs,
      batchSize: options.batchSize,
      learningRate: options.learningRate,
      proximalMu: options.proximalMu,
      restrictToLocalClasses: options.restrictToLocalClasses,
      trainableTensors: [...options.trainableTensors],
    },
    openedAtMs: round.openedAtMs,
    deadlineMs: round.deadlineMs,
    minUpdates: options.minUpdates,
    modelSha256,
  };
}

/** Builds the ack of one decided update. */
export function buildAck(
  decision: UpdateDecision,
  current: { round: number; modelVersion: number },
): UpdateAck {
  const update = decision.update;
  return {
    updateId: update?.updateId || UNKNOWN_UPDATE_ID,
    round: update?.round ?? 0,
    status: decision.accepted ? AckStatus.Accepted : AckStatus.Rejected,
    reasonCode: decision.accepted ? '' : decision.code,
    reason: decision.accepted ? '' : truncateText(decision.reason),
    currentRound: current.round,
    currentModelVersion: current.modelVersion,
  };
}
