/**
 * HKDF-SHA256 derivations of the round's symmetric keys. Every derivation
 * binds a purpose label, the round id and the vehicle ids in the HKDF info,
 * so a key derived for one purpose, round or pair never equals another.
 */
import { hkdfSync } from 'node:crypto';

const HKDF_SALT = Buffer.from('fleetlearn secure aggregation v1', 'utf8');

/** Node's hkdfSync rejects an info longer than 1024 bytes. */
const MAX_INFO_BYTES = 1024;

/** Bytes of every derived seed and key (AES-256). */
export const DERIVED_KEY_BYTES = 32;

/**
 * Encodes the label and fields with a 2-byte big-endian length before each,
 * so that no two field lists share an encoding whatever bytes ids contain.
 */
function encodeInfo(label: string, fields: readonly string[]): Buffer {
  const parts: Buffer[] = [];
  for (const text of [label, ...fields]) {
    const bytes = Buffer.from(text, 'utf8');
    const length = Buffer.alloc(2);
    length.writeUInt16BE(Math.min(bytes.length, 0xffff));
    parts.push(length, bytes);
  }
  const info = Buffer.concat(parts);
  if (info.length > MAX_INFO_BYTES) {
    throw new RangeError(
      `HKDF info for ${label} is ${info.length} bytes; round and vehicle ` +
        `ids must fit in ${MAX_INFO_BYTES}`,
    );
  }
  return info;
}

function derive(secret: Uint8Array, info: Buffer): Uint8Array {
  return new Uint8Array(
    hkdfSync('sha256', secret, HKDF_SALT, info, DERIVED_KEY_BYTES),
  );
}

/**
 * Derives the pairwise mask seed of two vehicles from their X25519 shared
 * secret. The ids enter in ascending order, so both sides get one seed.
 */
export function derivePairwiseMaskSeed(
  sharedSecret: Uint8Array,
  roundId: string,
  vehicleA: string,
  vehicleB: string,
): Uint8Array {
  const [low, high] =
    vehicleA < vehicleB ? [vehicleA, vehicleB] : [vehicleB, vehicleA];
  return derive(
    sharedSecret,
    encodeInfo('pairwise-mask', [roundId, low, high]),
  );
}

/** Derives a vehicle's self-mask seed from its secret b_u. */
export function deriveSelfMaskSeed(
  selfMaskSecret: Uint8Array,
  roundId: string,
  vehicleId: string,
): Uint8Array {
  return derive(selfMaskSecret, encodeInfo('self-mask', [roundId, vehicleId]));
}

/**
 * Returns the AES-GCM associated data of shares from sender to recipient.
 * The direction matters, so the two vehicles of a pair use two keys.
 */
export function shareAssociatedData(
  roundId: string,
  senderId: string,
  recipientId: string,
): Buffer {
  return encodeInfo('share-encryption', [roundId, senderId, recipientId]);
}

/** Derives the AES-256-GCM key for shares from sender to recipient. */
export function deriveShareEncryptionKey(
  sharedSecret: Uint8Array,
  roundId: string,
  senderId: string,
  recipientId: string,
): Uint8Array {
  return derive(
    sharedSecret,
    shareAssociatedData(roundId, senderId, recipientId),
  );
}
