/**
 * Codec of PartialAggregate, the message a depot aggregator sends the
 * fleet aggregator in hierarchical aggregation.
 */
import {
  DEFAULT_MAX_MESSAGE_BYTES,
  decodeWith,
  encodeWith,
  requireText,
  toSafeInteger,
} from './codec.ts';
import { ErrorCode, FleetError } from './errors.ts';
import type { PartialAggregate } from './messages.ts';
import { schema } from './schema.ts';

/**
 * Encodes a PartialAggregate.
 *
 * @throws {FleetError} PAYLOAD_TOO_LARGE when the encoding is above `maxBytes`.
 */
export function encodePartialAggregate(
  partial: PartialAggregate,
  maxBytes = DEFAULT_MAX_MESSAGE_BYTES,
): Uint8Array {
  return encodeWith(schema.PartialAggregate, partial, maxBytes);
}

/**
 * Decodes a PartialAggregate and checks what the wire format alone can
 * check: text fields present, 64-bit counts safe, entries sorted by
 * vehicle id without repeats, and `numExamples` equal to their sum.
 *
 * @throws {FleetError} MALFORMED_PAYLOAD on invalid bytes or a broken rule.
 */
export function decodePartialAggregate(bytes: Uint8Array): PartialAggregate {
  const object = decodeWith(schema.PartialAggregate, bytes);
  requireText('PartialAggregate', object, [
    'partialId',
    'depotId',
    'modelName',
  ]);
  object.numExamples = toSafeInteger('numExamples', object.numExamples);
  object.createdAtMs = toSafeInteger('createdAtMs', object.createdAtMs);
  if (object.createdAtMs === 0) {
    // created_at_ms is the last field written, so a payload cut at a
    // field boundary lacks it.
    throw new FleetError(
      ErrorCode.MalformedPayload,
      'PartialAggregate has no createdAtMs; the payload is truncated or ' +
        'was built without it',
    );
  }
  const entries = object.updates as Record<string, unknown>[];
  let total = 0;
  let previous = '';
  for (const [index, entry] of entries.entries()) {
    requireText(`PartialAggregate entry ${index}`, entry, [
      'vehicleId',
      'updateId',
    ]);
    entry.numExamples = toSafeInteger(
      `updates[${index}].numExamples`,
      entry.numExamples,
    );
    const vehicleId = entry.vehicleId as string;
    if (index > 0 && vehicleId <= previous) {
      throw new FleetError(
        ErrorCode.MalformedPayload,
        `PartialAggregate entry ${index} has vehicle ${JSON.stringify(vehicleId)} ` +
          `after ${JSON.stringify(previous)}; expected vehicle ids sorted ` +
          'and without repeats',
      );
    }
    previous = vehicleId;
    total += entry.numExamples as number;
  }
  if (entries.length === 0 || total !== object.numExamples) {
    throw new FleetError(
      ErrorCode.MalformedPayload,
      `PartialAggregate has ${entries.length} entries with ${total} ` +
        `examples and numExamples ${object.numExamples as number}; expected ` +
        'at least one entry and numExamples equal to their sum',
    );
  }
  return object as unknown as PartialAggregate;
}
