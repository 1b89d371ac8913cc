/**
 * Builders of the messages the aggregator publishes. Pure functions,
 * except that buildRoundTask records the compression it announces.
 */
import {
  AckStatus,
  type RoundTask,
  type UpdateAck,
} from '../protocol/index.ts';
import {
  NO_COMPRESSION,
  type CompressedRoundTask,
  type UpdateCompression,
} from '../protocol/compression/index.ts';
import type { ResolvedOptions } from './options.ts';
import type { OpenRound } from './round.ts';

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

/**
 * Compression announced in each round's task. Updates are validated
 * against what their round's task announced, so a per-round choice only
 * has to change the task.
 * NOTE: kept here because OpenRound and the fleet context, which would be
 * the natural owners, are built in files this change does not touch.
 */
const announcedCompression = new WeakMap<OpenRound, UpdateCompression>();

/**
 * Returns the compression the task of `round` announced, or float32 for a
 * round without a task (none was built, as in unit tests).
 */
export function compressionOfRound(round: OpenRound): UpdateCompression {
  return announcedCompression.get(round) ?? NO_COMPRESSION;
}

/**
 * Builds the RoundTask of `round` for a model with `modelSha256`, and
 * records its compression for {@link compressionOfRound}.
 */
export function buildRoundTask(
  round: OpenRound,
  options: ResolvedOptions,
  modelName: string,
  modelSha256: string,
): RoundTask {
  const compression = options.updateCompression;
  announcedCompression.set(round, compression);
  const task: CompressedRoundTask = {
    ...buildPlainTask(round, options, modelName, modelSha256),
    compression: { ...compression },
  };
  return task;
}

function buildPlainTask(
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

/**
 * Decision on an update or a depot's partial, with the fields its ack
 * reads. For a partial, `update.updateId` is the partialId. `update` is
 * unset when the message did not decode.
 */
export type AckedDecision = {
  update?: { updateId: string; round: number };
} & ({ accepted: true } | { accepted: false; code: string; reason: string });

/** Builds the ack of one decided update or depot partial. */
export function buildAck(
  decision: AckedDecision,
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
