/**
 * Checks of one incoming ModelUpdate against the open round. Pure: the
 * caller passes the round's state and gets a decision with a stable reason
 * code from protocol/errors.ts, so every rule can be tested without MQTT.
 */
import {
  ErrorCode,
  decodeModelUpdate,
  isFleetError,
  type ModelUpdate,
  type PublicKeySet,
} from '../protocol/index.ts';
import type { UpdateCompression } from '../protocol/compression/index.ts';
import type { WeightMap } from '../models/architecture.ts';
import { decodeDeltaTensors } from './delta-tensors.ts';
import { checkSigner, openUpdatePayload } from './update-signature.ts';

/** Round state that an update is validated against. */
export interface RoundContext {
  /** Number of the open round, or undefined between rounds. */
  openRound: number | undefined;
  /** Highest round number opened so far (0 before the first). */
  lastRound: number;
  modelName: string;
  /** Model version the open round trains from (the current version). */
  modelVersion: number;
  selectedVehicles: ReadonlySet<string>;
  /** Update ids accepted in the open round. */
  seenUpdateIds: ReadonlySet<string>;
  /**
   * Recently accepted update ids of earlier rounds, with their round, so
   * that a late copy is acked as a duplicate rather than as late.
   */
  earlierAccepted: ReadonlyMap<string, number>;
  /**
   * Vehicles whose update was accepted in the open round (keys from
   * acceptedKeyOf).
   */
  acceptedVehicles: ReadonlySet<string>;
  /** Sum of numExamples over the updates accepted in the open round. */
  acceptedExamples: number;
  /**
   * Asynchronous mode: the largest version lag an update may have. Any
   * vehicle may then send an update trained for an earlier round, from
   * a model at most this many versions old. Undefined for synchronous
   * rounds, which take only updates for the open round and its version.
   */
  maxStaleness?: number;
  /** Maximum numExamples of one update. */
  maxExamplesPerUpdate: number;
  /** Maximum |value| of a delta element. */
  maxAbsDeltaValue: number;
  /** Shape of each tensor an update must carry, by name. */
  trainableShapes: ReadonlyMap<string, readonly number[]>;
  maxMessageBytes: number;
  /**
   * Public update-signing keys of the vehicles. When set, every update
   * must be signed with the key of the vehicle it names.
   */
  vehicleKeys?: PublicKeySet;
  /**
   * Compression the open round's task announced; every delta must use its
   * encoding. Default float32.
   */
  updateCompression?: UpdateCompression;
}

/** An update that passed every check. */
export interface AcceptedUpdate {
  accepted: true;
  update: ModelUpdate;
  /** Decoded delta values by tensor name. */
  deltas: WeightMap;
}

/** An update that failed a check; `update` is set once it decoded. */
export interface RejectedUpdate {
  accepted: false;
  code: ErrorCode;
  reason: string;
  update?: ModelUpdate;
}

export type UpdateDecision = AcceptedUpdate | RejectedUpdate;

/**
 * Fields of an update that the round, model, duplicate and example-count
 * checks read. A depot's partial gives one per merged vehicle update.
 */
export type UpdateHeader = Pick<
  ModelUpdate,
  | 'updateId'
  | 'vehicleId'
  | 'round'
  | 'modelName'
  | 'baseModelVersion'
  | 'numExamples'
>;

function reject(
  code: ErrorCode,
  reason: string,
  update?: ModelUpdate,
): RejectedUpdate {
  return { accepted: false, code, reason, update };
}

/**
 * Decides whether the update `payload`, received on the update topic of
 * `topicVehicleId`, counts in the open round. Checks run in a fixed order
 * (size, envelope, signature when vehicle keys are set, decoding, signer,
 * sender, round, selection, model, duplicates, example count, tensors) and
 * the first failure decides the reason code. The signature comes before
 * decoding, so the aggregator parses no unauthenticated update.
 */
export function validateUpdate(
  topicVehicleId: string,
  payload: Uint8Array,
  context: RoundContext,
): UpdateDecision {
  if (payload.byteLength > context.maxMessageBytes) {
    return reject(
      ErrorCode.PayloadTooLarge,
      `update is ${payload.byteLength} bytes, above the maximum of ` +
        `${context.maxMessageBytes} bytes`,
    );
  }
  const opened = openUpdatePayload(
    topicVehicleId,
    payload,
    context.vehicleKeys,
  );
  if ('accepted' in opened) return opened;
  let update: ModelUpdate;
  try {
    update = decodeModelUpdate(opened.updateBytes);
  } catch (err) {
    if (!isFleetError(err)) throw err;
    return reject(err.code, err.message);
  }

  const problem =
    checkSigner(opened, update) ??
    checkSender(topicVehicleId, update) ??
    checkUpdateHeader(update, context);
  if (problem !== undefined) return { ...problem, update };

  const decoded = decodeDeltaTensors(
    update.deltas,
    `update ${update.updateId}`,
    { ...context, round: update.round },
  );
  if (!(decoded instanceof Map)) return { ...decoded, update };
  return { accepted: true, update, deltas: decoded };
}

/**
 * Checks `header` against the open round in the order of validateUpdate:
 * round and selection, model, duplicates, example count. Returns the
 * first failure, or undefined when every check passes.
 */
export function checkUpdateHeader(
  header: UpdateHeader,
  context: RoundContext,
): RejectedUpdate | undefined {
  return (
    checkRound(header, context) ??
    checkModel(header, context) ??
    checkDuplicate(header, context) ??
    checkExampleCount(header, context)
  );
}

function checkSender(
  topicVehicleId: string,
  update: ModelUpdate,
): RejectedUpdate | undefined {
  if (update.vehicleId === topicVehicleId) return undefined;
  return reject(
    ErrorCode.MalformedPayload,
    `update ${update.updateId} names vehicle ${update.vehicleId} but ` +
      `arrived on the update topic of vehicle ${topicVehicleId}`,
  );
}

function checkRound(
  update: UpdateHeader,
  context: RoundContext,
): RejectedUpdate | undefined {
  const current =
    `current round is ${context.openRound ?? 'none (between rounds)'}, ` +
    `model version ${context.modelVersion}`;
  const acceptedIn = context.earlierAccepted.get(update.updateId);
  if (acceptedIn !== undefined && acceptedIn !== context.openRound) {
    return reject(
      ErrorCode.DuplicateUpdate,
      `update ${update.updateId} was already accepted in round ` +
        `${acceptedIn}; ${current}`,
    );
  }
  if (context.maxStaleness !== undefined && context.openRound !== undefined) {
    // Asynchronous: any vehicle, any round opened so far; checkModel
    // bounds the staleness.
    if (update.round >= 1 && update.round <= context.openRound) {
      return undefined;
    }
    return reject(
      ErrorCode.WrongRound,
      `update ${update.updateId} is for round ${update.round}, which was ` +
        `never opened; ${current}`,
    );
  }
  if (context.openRound !== update.round) {
    // A round this aggregator opened and closed: the update is a straggler.
    const isClosed = update.round >= 1 && update.round <= context.lastRound;
    return reject(
      isClosed ? ErrorCode.RoundClosed : ErrorCode.WrongRound,
      `update ${update.updateId} is for round ${update.round}` +
        `${isClosed ? ', which has closed' : ''}; ${current}`,
    );
  }
  if (!context.selectedVehicles.has(update.vehicleId)) {
    return reject(
      ErrorCode.VehicleNotSelected,
      `vehicle ${update.vehicleId} is not selected for round ${update.round}`,
    );
  }
  return undefined;
}

function checkModel(
  update: UpdateHeader,
  context: RoundContext,
): RejectedUpdate | undefined {
  if (context.maxStaleness !== undefined) {
    const lag = context.modelVersion - update.baseModelVersion;
    if (
      update.modelName === context.modelName &&
      lag >= 0 &&
      lag <= context.maxStaleness
    ) {
      return undefined;
    }
    return reject(
      ErrorCode.WrongModelVersion,
      `update ${update.updateId} was trained from ${update.modelName} ` +
        `version ${update.baseModelVersion}, but the model is at ` +
        `${context.modelName} version ${context.modelVersion} and accepts ` +
        `updates at most ${context.maxStaleness} versions old`,
    );
  }
  if (
    update.modelName === context.modelName &&
    update.baseModelVersion === context.modelVersion
  ) {
    return undefined;
  }
  return reject(
    ErrorCode.WrongModelVersion,
    `update ${update.updateId} was trained from ${update.modelName} ` +
      `version ${update.baseModelVersion}, but round ${update.round} ` +
      `trains ${context.modelName} version ${context.modelVersion}`,
  );
}

function checkDuplicate(
  update: UpdateHeader,
  context: RoundContext,
): RejectedUpdate | undefined {
  if (context.seenUpdateIds.has(update.updateId)) {
    return reject(
      ErrorCode.DuplicateUpdate,
      `update ${update.updateId} was already received in round ${update.round}`,
    );
  }
  if (context.acceptedVehicles.has(acceptedKeyOf(update, context))) {
    return reject(
      ErrorCode.DuplicateUpdate,
      `vehicle ${update.vehicleId} already has an accepted update in ` +
        `round ${update.round}`,
    );
  }
  return undefined;
}

/**
 * Key of an accepted update in `acceptedVehicles`: the vehicle id, or in
 * asynchronous rounds the vehicle and the round it trained for, so that
 * one buffer takes a vehicle's stale update and its current one.
 */
export function acceptedKeyOf(
  update: Pick<ModelUpdate, 'vehicleId' | 'round'>,
  context: Pick<RoundContext, 'maxStaleness'>,
): string {
  return context.maxStaleness === undefined
    ? update.vehicleId
    : `${update.vehicleId}@${update.round}`;
}

function checkExampleCount(
  update: UpdateHeader,
  context: RoundContext,
): RejectedUpdate | undefined {
  const { numExamples, updateId } = update;
  const max = context.maxExamplesPerUpdate;
  if (numExamples < 1 || numExamples > max) {
    return reject(
      ErrorCode.InvalidExampleCount,
      `update ${updateId} has numExamples ${numExamples}, expected an ` +
        `integer between 1 and the maximum of ${max}`,
    );
  }
  // The round's sum goes into the release, whose codec takes only safe
  // integers. The per-update maximum keeps this unreachable by default.
  if (!Number.isSafeInteger(context.acceptedExamples + numExamples)) {
    return reject(
      ErrorCode.InvalidExampleCount,
      `update ${updateId} has numExamples ${numExamples}, which would ` +
        `raise the round's sum of ${context.acceptedExamples} above ` +
        `${Number.MAX_SAFE_INTEGER}`,
    );
  }
  return undefined;
}
