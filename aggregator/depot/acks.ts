/** Acks the depot sends its vehicles on its own or for the fleet. */
import {
  AckStatus,
  ErrorCode,
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
 * Builds the DUPLICATE_UPDATE ack of a merged update that the fleet had
 * counted already, outside this depot's partial (the fleet's ack lists it
 * in `duplicateUpdateIds`).
 */
export function duplicateAckOf(
  entry: DepotUpdateEntry,
  round: number,
  fleetAck: UpdateAck,
): UpdateAck {
  return {
    updateId: entry.updateId,
    round,
    status: AckStatus.Rejected,
    reasonCode: ErrorCode.DuplicateUpdate,
    reason:
      `update ${entry.updateId} of vehicle ${entry.vehicleId} was already ` +
      `counted by the fleet aggregator in round ${round}, not through ` +
      'this depot',
    currentRound: fleetAck.currentRound,
    currentModelVersion: fleetAck.currentModelVersion,
  };
}

/**
 * Returns the entries of `entries` that the fleet's ack lists as counted
 * already: only for a rejection with DUPLICATE_UPDATE, and [] otherwise.
 */
export function duplicateEntriesOf(
  entries: readonly DepotUpdateEntry[],
  fleetAck: UpdateAck,
): DepotUpdateEntry[] {
  const listed = fleetAck.duplicateUpdateIds ?? [];
  const isDuplicate =
    fleetAck.status === AckStatus.Rejected &&
    fleetAck.reasonCode === ErrorCode.DuplicateUpdate;
  if (!isDuplicate || listed.length === 0) return [];
  const ids = new Set(listed);
  return entries.filter((entry) => ids.has(entry.updateId));
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
  // Unreachable, because without an open round every update is rejected.
  if (decision.accepted) {
    throw new Error(
      `update of vehicle ${vehicleId} accepted without an open round, ` +
        'which validateUpdate must reject',
    );
  }
  return { decision, ack: buildAck(decision, { round: 0, modelVersion: 0 }) };
}
