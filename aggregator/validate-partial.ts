/**
 * Checks of one depot's PartialAggregate against the open round. Pure,
 * like validate.ts. The caller passes the round's state and the counted
 * partials, and gets a decision with a reason code from protocol/errors.ts.
 *
 * A partial is checked like the vehicle updates it merged: every entry
 * goes through the header checks of validate.ts (round, selection, model
 * version, duplicates, example count), and its mean delta through the
 * same tensor checks, in float32 only.
 */
import protobuf from 'protobufjs';
import {
  ErrorCode,
  decodePartialAggregate,
  isFleetError,
  type PartialAggregate,
} from '../protocol/index.ts';
import { NO_COMPRESSION } from '../protocol/compression/index.ts';
import type { WeightMap } from '../models/architecture.ts';
import { MAX_ABS_WEIGHTED_DELTA, MAX_EXAMPLES_PER_ADD } from './fedavg.ts';
import { decodeDeltaTensors } from './delta-tensors.ts';
import {
  acceptedKeyOf,
  checkUpdateHeader,
  type RejectedUpdate,
  type RoundContext,
} from './validate.ts';

/** Record of a counted partial, with the fields the copy check compares. */
export interface CountedPartialRecord {
  round: number;
  /** Update ids of its entries, in entry order. */
  updateIds: readonly string[];
}

/** State a partial is judged against. */
export interface PartialContext extends RoundContext {
  /** Depot ids of the option `depots`. */
  depots: ReadonlySet<string>;
  /**
   * The partial counted under this key (see partialKeyOf) in the open
   * round or a recent one, or undefined.
   */
  countedPartial(key: string): CountedPartialRecord | undefined;
}

/** Fields of a partial that its ack and log line need. */
export interface PartialHeader {
  partialId: string;
  /** Round the partial was sent for, 0 when the payload has none. */
  round: number;
}

/** A partial that passed every check, or a copy of a counted one. */
export interface AcceptedPartial {
  accepted: true;
  partial: PartialAggregate;
  /** Decoded mean delta, or undefined for a copy of a counted partial. */
  meanDeltas: WeightMap | undefined;
}

/**
 * A partial that failed a check. `partial` is set once it decoded, and
 * `header` whenever its partial id could be read.
 */
export interface RejectedPartial {
  accepted: false;
  code: ErrorCode;
  reason: string;
  partial?: PartialAggregate;
  header?: PartialHeader;
  /**
   * Update ids of the entries the open round counted already, set only
   * when they are the partial's only problem (code DUPLICATE_UPDATE).
   */
  duplicateUpdateIds?: string[];
}

export type PartialDecision = AcceptedPartial | RejectedPartial;

/**
 * Returns the key of a partial in OpenRound. The depot id passed
 * assertTopicLevel in FleetTopics.depotPartial (see DepotPartials.receive),
 * and decidePartial requires the payload's depot id to equal it. So the
 * depot id contains no "/", the first "/" ends it, and keys cannot collide.
 */
export function partialKeyOf(
  partial: Pick<PartialAggregate, 'depotId' | 'partialId'>,
): string {
  return `${partial.depotId}/${partial.partialId}`;
}

function reject(
  code: ErrorCode,
  reason: string,
  partial?: PartialAggregate,
): RejectedPartial {
  const header =
    partial === undefined
      ? undefined
      : { partialId: partial.partialId, round: partial.round };
  return { accepted: false, code, reason, partial, header };
}

/** Field numbers of PartialAggregate in protocol/fleetlearn_v1.proto. */
const PARTIAL_ID_FIELD = 1;
const ROUND_FIELD = 5;
const WIRE_VARINT = 0;
const WIRE_LENGTH_DELIMITED = 2;

/**
 * Reads the partial id and round of a payload that was not decoded (too
 * large, or from an unknown depot) or that broke a rule of
 * decodePartialAggregate. Its rejection is then still acked under the
 * partial id the depot waits for. It walks the top-level fields and skips
 * the other fields unread, so the cost does not grow with the tensors' size.
 * Returns undefined when the bytes are not a whole protobuf message or
 * carry no partial id.
 */
export function readPartialHeader(
  payload: Uint8Array,
): PartialHeader | undefined {
  let partialId = '';
  let round = 0;
  try {
    const reader = protobuf.Reader.create(payload);
    while (reader.pos < reader.len) {
      const tag = reader.uint32();
      const field = tag >>> 3;
      const wireType = tag & 7;
      if (field === PARTIAL_ID_FIELD && wireType === WIRE_LENGTH_DELIMITED) {
        partialId = reader.string();
      } else if (field === ROUND_FIELD && wireType === WIRE_VARINT) {
        round = reader.uint32();
      } else {
        reader.skipType(wireType, 0, field);
      }
    }
  } catch {
    return undefined;
  }
  return partialId === '' ? undefined : { partialId, round };
}

/**
 * Rejects a payload that did not reach decoding or failed it, with the
 * partial id read from the raw bytes when they carry one.
 */
function rejectUndecoded(
  code: ErrorCode,
  reason: string,
  payload: Uint8Array,
): RejectedPartial {
  return { ...reject(code, reason), header: readPartialHeader(payload) };
}

/**
 * Decides whether `payload`, received on the partial topic of
 * `topicDepotId`, counts in the open round. Checks run in a fixed order
 * (size, depot, decoding, sender, copy of a counted partial, entries,
 * total examples, tensors) and the first failure decides the code. The
 * exception is an entry the open round counted already: the other checks
 * still run, and only when all of them pass is the partial rejected with
 * DUPLICATE_UPDATE and the ids of those entries.
 */
export function decidePartial(
  topicDepotId: string,
  payload: Uint8Array,
  context: PartialContext,
): PartialDecision {
  if (payload.byteLength > context.maxMessageBytes) {
    return rejectUndecoded(
      ErrorCode.PayloadTooLarge,
      `partial is ${payload.byteLength} bytes, above the maximum of ` +
        `${context.maxMessageBytes} bytes`,
      payload,
    );
  }
  if (!context.depots.has(topicDepotId)) {
    return rejectUndecoded(
      ErrorCode.InvalidConfig,
      `depot ${topicDepotId} is not one of the fleet aggregator's ` +
        `${context.depots.size} depots; add it to the aggregator's --depots`,
      payload,
    );
  }
  let partial: PartialAggregate;
  try {
    partial = decodePartialAggregate(payload);
  } catch (err) {
    if (!isFleetError(err)) throw err;
    return rejectUndecoded(err.code, err.message, payload);
  }
  if (partial.depotId !== topicDepotId) {
    return reject(
      ErrorCode.MalformedPayload,
      `partial ${partial.partialId} names depot ${partial.depotId} but ` +
        `arrived on the partial topic of depot ${topicDepotId}`,
      partial,
    );
  }

  const counted = context.countedPartial(partialKeyOf(partial));
  if (counted !== undefined) return decideCopy(partial, counted);
  const entries = checkEntries(partial, context);
  const problem = entries.problem ?? checkTotal(partial, context);
  if (problem !== undefined) {
    return reject(problem.code, problem.reason, partial);
  }

  const meanDeltas = decodeMeanDeltas(partial, context);
  if (!(meanDeltas instanceof Map)) {
    return reject(
      meanDeltas.code,
      describe(partial, meanDeltas.reason),
      partial,
    );
  }
  if (entries.counted.length > 0) {
    return rejectCounted(partial, entries.counted);
  }
  return { accepted: true, partial, meanDeltas };
}

function decodeMeanDeltas(
  partial: PartialAggregate,
  context: RoundContext,
): WeightMap | RejectedUpdate {
  return decodeDeltaTensors(partial.meanDeltas, 'meanDeltas', {
    round: partial.round,
    trainableShapes: context.trainableShapes,
    // The FedAvg sums weight each value by the partial's numExamples,
    // so the kernel's bound on the product may be the tighter one.
    maxAbsDeltaValue: Math.min(
      context.maxAbsDeltaValue,
      MAX_ABS_WEIGHTED_DELTA / partial.numExamples,
    ),
    // The depot decodes its vehicles' updates before merging them.
    updateCompression: NO_COMPRESSION,
  });
}

/**
 * Accepts again a copy of a partial counted in the open round or a recent
 * one, whose first ack may have been lost, without counting it twice. The
 * same id for other updates or another round is rejected, because acking
 * it would drop those updates unseen.
 */
function decideCopy(
  partial: PartialAggregate,
  counted: CountedPartialRecord,
): PartialDecision {
  const updateIds = partial.updates.map((entry) => entry.updateId);
  const isSame =
    partial.round === counted.round &&
    updateIds.length === counted.updateIds.length &&
    updateIds.every((id, index) => id === counted.updateIds[index]);
  if (isSame) return { accepted: true, partial, meanDeltas: undefined };
  return reject(
    ErrorCode.DuplicateUpdate,
    describe(
      partial,
      `round ${counted.round} counted a partial with this id for updates ` +
        `[${counted.updateIds.join(', ')}], not round ${partial.round} ` +
        `updates [${updateIds.join(', ')}]; expected a new partial id for ` +
        'another set of updates',
    ),
    partial,
  );
}

function describe(partial: PartialAggregate, reason: string): string {
  return `partial ${partial.partialId} from depot ${partial.depotId}: ${reason}`;
}

/** An entry whose update the open round counted already. */
interface CountedEntry {
  updateId: string;
  reason: string;
}

/** Outcome of checkEntries. */
interface EntriesCheck {
  /** The first problem other than an entry counted already. */
  problem?: RejectedPartial;
  /** Entries counted already, in entry order, when there is no problem. */
  counted: CountedEntry[];
}

const NONE: ReadonlySet<string> = new Set();

/**
 * Checks each entry as the header of a vehicle update of the partial's
 * round and model, and that no update id appears twice. An entry the
 * open round counted already, by update id or by vehicle, is collected
 * instead of failing the check, unless it also fails another one.
 */
function checkEntries(
  partial: PartialAggregate,
  context: RoundContext,
): EntriesCheck {
  const uncounted = { ...context, seenUpdateIds: NONE, acceptedVehicles: NONE };
  const updateIds = new Set<string>();
  const counted: CountedEntry[] = [];
  for (const entry of partial.updates) {
    const header = {
      ...entry,
      round: partial.round,
      modelName: partial.modelName,
      baseModelVersion: partial.baseModelVersion,
    };
    const isCounted =
      context.seenUpdateIds.has(entry.updateId) ||
      context.acceptedVehicles.has(acceptedKeyOf(header, context));
    // For a counted entry the full context stops at the duplicate check,
    // so the context without counted updates finds any later problem.
    const full = checkUpdateHeader(header, context);
    const problem: RejectedUpdate | undefined =
      (isCounted ? checkUpdateHeader(header, uncounted) : full) ??
      (updateIds.has(entry.updateId)
        ? {
            accepted: false,
            code: ErrorCode.DuplicateUpdate,
            reason: `update ${entry.updateId} appears in two entries`,
          }
        : undefined);
    if (problem !== undefined) {
      const reason = `entry of vehicle ${entry.vehicleId}: ${problem.reason}`;
      return {
        problem: reject(problem.code, describe(partial, reason)),
        counted: [],
      };
    }
    if (isCounted && full !== undefined) {
      counted.push({
        updateId: entry.updateId,
        reason: `entry of vehicle ${entry.vehicleId}: ${full.reason}`,
      });
    }
    updateIds.add(entry.updateId);
  }
  return { counted };
}

/**
 * Rejects a partial whose only problem is entries the open round counted
 * already, for example updates a vehicle also sent straight to the fleet.
 * The ack lists their update ids, so that the depot can send the other
 * entries again in a new partial instead of losing them all.
 */
function rejectCounted(
  partial: PartialAggregate,
  counted: readonly CountedEntry[],
): RejectedPartial {
  const reasons = counted.map((entry) => entry.reason).join('; ');
  return {
    ...reject(ErrorCode.DuplicateUpdate, describe(partial, reasons), partial),
    duplicateUpdateIds: counted.map((entry) => entry.updateId),
  };
}

/** Checks that the partial's weight fits the FedAvg sums exactly. */
function checkTotal(
  partial: PartialAggregate,
  context: RoundContext,
): RejectedPartial | undefined {
  const { numExamples } = partial;
  if (numExamples > MAX_EXAMPLES_PER_ADD) {
    return reject(
      ErrorCode.InvalidExampleCount,
      describe(
        partial,
        `numExamples ${numExamples} is above ${MAX_EXAMPLES_PER_ADD}, the ` +
          'largest weight the FedAvg sums add exactly',
      ),
    );
  }
  if (!Number.isSafeInteger(context.acceptedExamples + numExamples)) {
    return reject(
      ErrorCode.InvalidExampleCount,
      describe(
        partial,
        `numExamples ${numExamples} would raise the round's sum of ` +
          `${context.acceptedExamples} above ${Number.MAX_SAFE_INTEGER}`,
      ),
    );
  }
  return undefined;
}
