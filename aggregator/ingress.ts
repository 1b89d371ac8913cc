/**
 * Handling of one update message: validation, counting in the open round,
 * the log line and the ack. Publishing the ack is left to the caller.
 */
import { encodeUpdateAck, type Logger } from '../protocol/index.ts';
import type { UpdateDecidedEvent } from './events.ts';
import { buildAck, compressionOfRound, truncateText } from './messages.ts';
import type { FleetContext, OpenRound } from './round.ts';
import {
  validateUpdate,
  type RoundContext,
  type UpdateDecision,
} from './validate.ts';

/** Maximum length of an update id copied into a log line. */
const MAX_LOGGED_ID_CHARS = 130;

/** Outcome of {@link receiveUpdate}. */
export interface ReceivedUpdate {
  decision: UpdateDecision;
  /** Encoded UpdateAck for the vehicle's ack topic. */
  ack: Uint8Array;
  event: UpdateDecidedEvent;
}

/** State of the aggregator an update is judged against. */
export interface IngressState {
  fleet: FleetContext;
  /** The round of the last RoundTask; closed rounds reject updates. */
  round: OpenRound | undefined;
  currentModelVersion: number;
}

/**
 * Validates `payload` from the update topic of `vehicleId`, records it in
 * the open round (accepted deltas go into the FedAvg sum), logs the
 * decision and encodes the ack.
 */
export function receiveUpdate(
  vehicleId: string,
  payload: Uint8Array,
  state: IngressState,
  log: Logger,
): ReceivedUpdate {
  const { round, fleet } = state;
  const context = roundContextOf(state);
  const decision = validateUpdate(vehicleId, payload, context);
  if (round?.isOpen) round.record(payload.byteLength, decision);

  logDecision(log, vehicleId, payload.byteLength, decision, context);
  const current = {
    round: fleet.lastRound,
    modelVersion: state.currentModelVersion,
  };
  return {
    decision,
    ack: encodeUpdateAck(buildAck(decision, current)),
    event: {
      vehicleId,
      round: decision.update?.round,
      updateId: decision.update?.updateId,
      accepted: decision.accepted,
      reasonCode: decision.accepted ? undefined : decision.code,
      bytes: payload.byteLength,
      numExamples: decision.update?.numExamples,
      trainLoss: decision.accepted
        ? decision.update.metrics.trainLoss
        : undefined,
    },
  };
}

/**
 * Returns the validation context of a message arriving now. It is the
 * open round's context, or between rounds one in which every update is
 * late.
 */
export function roundContextOf(state: IngressState): RoundContext {
  const { round, fleet } = state;
  if (round === undefined) {
    return {
      ...fleet,
      openRound: undefined,
      modelVersion: state.currentModelVersion,
      selectedVehicles: new Set(),
      seenUpdateIds: new Set(),
      acceptedVehicles: new Set(),
      acceptedExamples: 0,
    };
  }
  return {
    ...round.contextFor(fleet),
    updateCompression: compressionOfRound(round),
  };
}

function logDecision(
  log: Logger,
  vehicleId: string,
  bytes: number,
  decision: UpdateDecision,
  context: RoundContext,
): void {
  const update = decision.update;
  const fields = {
    vehicleId,
    round: update?.round,
    updateId:
      update === undefined
        ? undefined
        : truncateText(update.updateId, MAX_LOGGED_ID_CHARS),
    bytes,
  };
  if (decision.accepted) {
    log.debug(
      { ...fields, numExamples: decision.update.numExamples },
      'update accepted',
    );
    return;
  }
  log.warn(
    {
      ...fields,
      openRound: context.openRound,
      code: decision.code,
      reason: truncateText(decision.reason),
    },
    'update rejected',
  );
}
