/**
 * The signature step of update validation: unwraps a SignedUpdate and,
 * when the aggregator has the vehicles' public keys, checks that the
 * update is signed and that the key belongs to the sending vehicle.
 */
import {
  ErrorCode,
  decodeSignedUpdate,
  isFleetError,
  verifyEnvelope,
  type ModelUpdate,
  type PublicKeySet,
} from '../protocol/index.ts';
import type { RejectedUpdate } from './validate.ts';

/** An update payload with its envelope removed. */
export interface OpenedUpdate {
  /** The encoded ModelUpdate. */
  updateBytes: Uint8Array;
  /** Vehicle whose key made a checked signature; undefined otherwise. */
  signerVehicleId?: string;
  keyId?: string;
}

function rejected(code: ErrorCode, reason: string): RejectedUpdate {
  return { accepted: false, code, reason };
}

/**
 * Removes the envelope of `payload`, received on the update topic of
 * `topicVehicleId`. With `vehicleKeys` the payload must be a SignedUpdate
 * whose key is known, whose signature verifies and whose key belongs to
 * the topic's vehicle. Without them a bare ModelUpdate passes as it is,
 * and a SignedUpdate is unwrapped without a check, so vehicles can start
 * signing before the aggregator requires it.
 */
export function openUpdatePayload(
  topicVehicleId: string,
  payload: Uint8Array,
  vehicleKeys: PublicKeySet | undefined,
): OpenedUpdate | RejectedUpdate {
  let envelope;
  try {
    envelope = decodeSignedUpdate(payload);
  } catch (err) {
    if (!isFleetError(err)) throw err;
    return rejected(err.code, err.message);
  }
  if (envelope === undefined) {
    if (vehicleKeys === undefined) return { updateBytes: payload };
    return rejected(
      ErrorCode.NotSigned,
      `update on the topic of vehicle ${topicVehicleId} is not signed; ` +
        'this aggregator takes only updates signed with the vehicle key',
    );
  }
  if (vehicleKeys === undefined) return { updateBytes: envelope.signedBytes };

  let key;
  try {
    key = verifyEnvelope('update', envelope, vehicleKeys);
  } catch (err) {
    if (!isFleetError(err)) throw err;
    return rejected(err.code, err.message);
  }
  if (key.vehicleId !== topicVehicleId) {
    return rejected(
      ErrorCode.SignerMismatch,
      `update signed with key ${key.keyId} of vehicle ${key.vehicleId} ` +
        `arrived on the update topic of vehicle ${topicVehicleId}`,
    );
  }
  return {
    updateBytes: envelope.signedBytes,
    signerVehicleId: key.vehicleId,
    keyId: key.keyId,
  };
}

/**
 * Checks that a signed update names the vehicle whose key signed it.
 * Returns undefined for an unsigned or matching update.
 */
export function checkSigner(
  opened: OpenedUpdate,
  update: ModelUpdate,
): RejectedUpdate | undefined {
  const signer = opened.signerVehicleId;
  if (signer === undefined || update.vehicleId === signer) return undefined;
  return {
    ...rejected(
      ErrorCode.SignerMismatch,
      `update ${update.updateId} names vehicle ${update.vehicleId} but is ` +
        `signed with key ${opened.keyId} of vehicle ${signer}`,
    ),
    update,
  };
}
