/** Acks the depot sends its vehicles on its own or for the fleet. */
import {
  AckStatus,
  type DepotUpdateEntry,
  type UpdateAck,
} from '../../protocol/index.ts';
import { buildAck } from '../messages.ts';
import { validateUpdate, type RejectedUpdate } from '../validate.ts';
import type { UpdateCaps } from './collector.ts';

/** Builds the ack of one merged update from the fleet's ack of its partial. */
export function vehicleAckOf(
  entry: DepotUpdateEntry,
  round: number,
  fleetAck: UpdateAck,
): UpdateAck {
  const isAccepted = fleetAck.status === AckStatus.Accepted;
  return {
    updateId: entry.updateId,
    round,
    status: isAccepted ? AckStatus.Accepted : AckStatus.Rejected,
    reasonCode: isAccepted ? '' : fleetAck.reasonCode,
    reason: isAccepted ? '' : fleetAck.reason,
    currentRound: fleetAck.currentRound,
    currentModelVersion: fleetAck.currentModelVersion,
  };
}

/**
 * Rejects an update that arrives before the depot has a round task, with
 * WRONG_ROUND or the code of an earlier check. Its ack names round 0 and
 * version 0 as the current ones, as the fleet aggregator's acks do before
 * its first round.
 */
export function rejectWithoutTask(
  vehicleId: string,
  payload: Uint8Array,
  caps: UpdateCaps,
): { decision: RejectedUpdate; ack: UpdateAck } {
  const decision = validateUpdate(vehicleId, payload, {
    openRound: undefined,
    lastRound: 0,
    modelName: '',
    modelVersion: 0,
    selectedVehicles: new Set(),
    seenUpdateIds: new Set(),
    earlierAccepted: new Map(),
    acceptedVehicles: new Set(),
    acceptedExamples: 0,
    trainableShapes: new Map(),
    ...caps,
  });
  // Unreachable: without an open round every update is rejected.
  if (decision.accepted) throw new Error('update accepted without a round');
  return { decision, ack: buildAck(decision, { round: 0, modelVersion: 0 }) };
}
