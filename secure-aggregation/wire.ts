/**
 * Protobuf encoding of the secure aggregation messages that travel over
 * MQTT (protocol/secure_aggregation_v1.proto), converted to and from the
 * plain objects the state machines take (messages.ts).
 */
import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';
import { ErrorCode, FleetError, toSafeInteger } from '../protocol/index.ts';
import type {
  EncryptedShare,
  KeyAdvertisement,
  MaskedInput,
  RevealedShare,
  UnmaskRequest,
  UnmaskResponse,
} from './messages.ts';
import {
  FIELD_ELEMENT_BYTES,
  bytesToFieldElement,
  fieldElementToBytes,
} from './shamir.ts';

const root = protobuf.loadSync(
  fileURLToPath(
    new URL('../protocol/secure_aggregation_v1.proto', import.meta.url),
  ),
);
const FromVehicleType = root.lookupType('fleetlearn.v1.SecAggFromVehicle');
const ToVehicleType = root.lookupType('fleetlearn.v1.SecAggToVehicle');

const TO_OBJECT: protobuf.IConversionOptions = {
  longs: String,
  defaults: true,
  arrays: true,
  oneofs: true,
};

/**
 * Id of one secure round, for the state machines and the key derivation.
 * The open time separates two rounds with the same number.
 */
export function secureRoundId(
  fleetId: string,
  round: number,
  openedAtMs: number,
): string {
  return `${fleetId}/${round}@${openedAtMs}`;
}

/** The round a secure aggregation message belongs to. */
export interface SecureRoundRef {
  round: number;
  roundOpenedAtMs: number;
}

/** A vehicle's message for one phase. */
export type FromVehicleBody =
  | { kind: 'keys'; advertisement: KeyAdvertisement }
  | { kind: 'shares'; shares: EncryptedShare[] }
  | { kind: 'masked-input'; input: MaskedInput }
  | { kind: 'unmask-response'; response: UnmaskResponse };

/** The aggregator's message to one vehicle for one phase. */
export type ToVehicleBody =
  | { kind: 'key-list'; advertisements: KeyAdvertisement[] }
  | { kind: 'routed-shares'; shares: EncryptedShare[] }
  | { kind: 'unmask-request'; request: UnmaskRequest };

export interface FromVehicleMessage extends SecureRoundRef {
  vehicleId: string;
  body: FromVehicleBody;
}

export interface ToVehicleMessage extends SecureRoundRef {
  body: ToVehicleBody;
}

function malformed(message: string, cause?: unknown): FleetError {
  return new FleetError(
    ErrorCode.MalformedPayload,
    message,
    cause === undefined ? undefined : { cause },
  );
}

function encode(type: protobuf.Type, message: object, maxBytes: number) {
  const problem = type.verify(message);
  if (problem !== null) {
    throw malformed(`cannot encode ${type.name}: ${problem}`);
  }
  const bytes = type.encode(type.fromObject(message)).finish();
  if (bytes.length > maxBytes) {
    throw new FleetError(
      ErrorCode.PayloadTooLarge,
      `encoded ${type.name} is ${bytes.length} bytes, above the maximum ` +
        `of ${maxBytes} bytes`,
    );
  }
  return bytes;
}

function decode(type: protobuf.Type, bytes: Uint8Array): Record<string, any> {
  try {
    return type.toObject(type.decode(bytes), TO_OBJECT);
  } catch (err) {
    throw malformed(
      `cannot decode ${type.name} from ${bytes.length} bytes: ` +
        (err as Error).message,
      err,
    );
  }
}

/** Little-endian bytes of `words`, whatever the host's byte order. */
export function wordsToBytes(words: Uint32Array): Uint8Array {
  const bytes = new Uint8Array(words.length * 4);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < words.length; i++) view.setUint32(i * 4, words[i], true);
  return bytes;
}

/** @throws FleetError MALFORMED_PAYLOAD for a length not a multiple of 4. */
export function bytesToWords(bytes: Uint8Array): Uint32Array {
  if (bytes.length % 4 !== 0) {
    throw malformed(
      `masked input has ${bytes.length} bytes; expected a multiple of 4`,
    );
  }
  const words = new Uint32Array(bytes.length / 4);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  for (let i = 0; i < words.length; i++) words[i] = view.getUint32(i * 4, true);
  return words;
}

/** Returns a Uint8Array view of a decoded bytes field, which protobufjs gives as a Buffer. */
function plain(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

function shareToWire(share: EncryptedShare) {
  return {
    senderId: share.senderId,
    recipientId: share.recipientId,
    nonce: share.nonce,
    ciphertext: share.ciphertext,
    authTag: share.authTag,
  };
}

function shareFromWire(wire: any, roundId: string): EncryptedShare {
  return {
    roundId,
    senderId: wire.senderId,
    recipientId: wire.recipientId,
    nonce: plain(wire.nonce),
    ciphertext: plain(wire.ciphertext),
    authTag: plain(wire.authTag),
  };
}

function keysToWire(advertisement: KeyAdvertisement) {
  return {
    vehicleId: advertisement.vehicleId,
    maskPublicKey: advertisement.maskPublicKey,
    sharePublicKey: advertisement.sharePublicKey,
  };
}

function keysFromWire(wire: any, roundId: string): KeyAdvertisement {
  return {
    roundId,
    vehicleId: wire.vehicleId,
    maskPublicKey: plain(wire.maskPublicKey),
    sharePublicKey: plain(wire.sharePublicKey),
  };
}

function revealedToWire(revealed: RevealedShare) {
  return {
    ownerId: revealed.ownerId,
    x: revealed.share.x,
    y: fieldElementToBytes(revealed.share.y, FIELD_ELEMENT_BYTES),
  };
}

function revealedFromWire(wire: any): RevealedShare {
  if (!Number.isInteger(wire.x) || wire.x < 1) {
    throw malformed(`revealed share x is ${wire.x}; expected an integer >= 1`);
  }
  if (wire.y.length > FIELD_ELEMENT_BYTES) {
    throw malformed(
      `revealed share y has ${wire.y.length} bytes; expected at most ` +
        `${FIELD_ELEMENT_BYTES}`,
    );
  }
  try {
    return {
      ownerId: wire.ownerId,
      share: { x: wire.x, y: bytesToFieldElement(wire.y) },
    };
  } catch (err) {
    throw malformed(`revealed share y is not a field element`, err);
  }
}

/** Encodes a vehicle's message; PAYLOAD_TOO_LARGE above `maxBytes`. */
export function encodeFromVehicle(
  message: FromVehicleMessage,
  maxBytes: number,
): Uint8Array {
  const { body } = message;
  const wire: Record<string, unknown> = {
    round: message.round,
    vehicleId: message.vehicleId,
    roundOpenedAtMs: message.roundOpenedAtMs,
  };
  switch (body.kind) {
    case 'keys':
      wire.keys = keysToWire(body.advertisement);
      break;
    case 'shares':
      wire.shares = { shares: body.shares.map(shareToWire) };
      break;
    case 'masked-input':
      wire.maskedInput = { maskedWords: wordsToBytes(body.input.maskedWords) };
      break;
    case 'unmask-response':
      wire.unmaskResponse = {
        selfMaskShares: body.response.selfMaskShares.map(revealedToWire),
        maskKeyShares: body.response.maskKeyShares.map(revealedToWire),
      };
      break;
  }
  return encode(FromVehicleType, wire, maxBytes);
}

function refOf(object: Record<string, any>): SecureRoundRef {
  return {
    round: object.round,
    roundOpenedAtMs: toSafeInteger('roundOpenedAtMs', object.roundOpenedAtMs),
  };
}

/**
 * Decodes a vehicle's message of fleet `fleetId`. The state machines check
 * keys, shares and phases; this checks the encoding.
 *
 * @throws FleetError MALFORMED_PAYLOAD for bytes that are not one, or one
 *   without a body or vehicle id.
 */
export function decodeFromVehicle(
  bytes: Uint8Array,
  fleetId: string,
): FromVehicleMessage {
  const object = decode(FromVehicleType, bytes);
  const ref = refOf(object);
  const vehicleId = object.vehicleId as string;
  if (vehicleId === '') throw malformed('SecAggFromVehicle has no vehicleId');
  const roundId = secureRoundId(fleetId, ref.round, ref.roundOpenedAtMs);
  let body: FromVehicleBody;
  switch (object.body) {
    case 'keys':
      body = {
        kind: 'keys',
        advertisement: keysFromWire(object.keys, roundId),
      };
      break;
    case 'shares':
      body = {
        kind: 'shares',
        shares: object.shares.shares.map((s: any) => shareFromWire(s, roundId)),
      };
      break;
    case 'maskedInput':
      body = {
        kind: 'masked-input',
        input: {
          roundId,
          vehicleId,
          maskedWords: bytesToWords(object.maskedInput.maskedWords),
        },
      };
      break;
    case 'unmaskResponse':
      body = {
        kind: 'unmask-response',
        response: {
          roundId,
          vehicleId,
          selfMaskShares:
            object.unmaskResponse.selfMaskShares.map(revealedFromWire),
          maskKeyShares:
            object.unmaskResponse.maskKeyShares.map(revealedFromWire),
        },
      };
      break;
    default:
      throw malformed('SecAggFromVehicle has no body');
  }
  return { ...ref, vehicleId, body };
}

/** Encodes the aggregator's message; PAYLOAD_TOO_LARGE above `maxBytes`. */
export function encodeToVehicle(
  message: ToVehicleMessage,
  maxBytes: number,
): Uint8Array {
  const { body } = message;
  const wire: Record<string, unknown> = {
    round: message.round,
    roundOpenedAtMs: message.roundOpenedAtMs,
  };
  switch (body.kind) {
    case 'key-list':
      wire.keyList = { keys: body.advertisements.map(keysToWire) };
      break;
    case 'routed-shares':
      wire.routedShares = { shares: body.shares.map(shareToWire) };
      break;
    case 'unmask-request':
      wire.unmaskRequest = {
        survivorIds: body.request.survivorIds,
        droppedIds: body.request.droppedIds,
      };
      break;
  }
  return encode(ToVehicleType, wire, maxBytes);
}

/**
 * Decodes the aggregator's message to a vehicle of fleet `fleetId`.
 *
 * @throws FleetError MALFORMED_PAYLOAD for bytes that are not one, or one
 *   without a body.
 */
export function decodeToVehicle(
  bytes: Uint8Array,
  fleetId: string,
): ToVehicleMessage {
  const object = decode(ToVehicleType, bytes);
  const ref = refOf(object);
  const roundId = secureRoundId(fleetId, ref.round, ref.roundOpenedAtMs);
  let body: ToVehicleBody;
  switch (object.body) {
    case 'keyList':
      body = {
        kind: 'key-list',
        advertisements: object.keyList.keys.map((k: any) =>
          keysFromWire(k, roundId),
        ),
      };
      break;
    case 'routedShares':
      body = {
        kind: 'routed-shares',
        shares: object.routedShares.shares.map((s: any) =>
          shareFromWire(s, roundId),
        ),
      };
      break;
    case 'unmaskRequest':
      body = {
        kind: 'unmask-request',
        request: {
          roundId,
          survivorIds: object.unmaskRequest.survivorIds,
          droppedIds: object.unmaskRequest.droppedIds,
        },
      };
      break;
    default:
      throw malformed('SecAggToVehicle has no body');
  }
  return { ...ref, body };
}
