/**
 * Checks that the vehicle and the server both apply to round options, the
 * broadcast key list and the unmask request.
 */
import { protocolViolation, quorumNotMet } from './errors.ts';
import type { KeyAdvertisement, UnmaskRequest } from './messages.ts';
import { X25519_KEY_BYTES } from './x25519.ts';

/** @throws TypeError or RangeError for an empty round id or bad threshold. */
export function checkRoundOptions(roundId: string, threshold: number): void {
  if (typeof roundId !== 'string' || roundId === '') {
    throw new TypeError('roundId must be a non-empty string');
  }
  // A threshold of 1 would let any single share reveal a secret.
  if (!Number.isInteger(threshold) || threshold < 2) {
    throw new RangeError(
      `threshold is ${threshold}; expected an integer of at least 2`,
    );
  }
}

function isRawKey(key: unknown): boolean {
  return key instanceof Uint8Array && key.length === X25519_KEY_BYTES;
}

/**
 * Checks one key advertisement: the round, a non-empty id and two distinct
 * 32-byte keys.
 *
 * @throws FleetError MALFORMED_PAYLOAD otherwise.
 */
export function checkAdvertisement(
  advertisement: KeyAdvertisement,
  roundId: string,
): void {
  const { vehicleId, maskPublicKey, sharePublicKey } = advertisement;
  const isWellFormed =
    advertisement.roundId === roundId &&
    typeof vehicleId === 'string' &&
    vehicleId !== '' &&
    isRawKey(maskPublicKey) &&
    isRawKey(sharePublicKey);
  if (!isWellFormed) {
    throw protocolViolation(
      `key advertisement of vehicle ${vehicleId} for round ` +
        `${advertisement.roundId} is malformed or for another round ` +
        `(expected round ${roundId} and two ${X25519_KEY_BYTES}-byte keys)`,
    );
  }
  if (Buffer.from(maskPublicKey).equals(sharePublicKey)) {
    throw protocolViolation(
      `vehicle ${vehicleId} advertised one key for both purposes`,
    );
  }
}

/** Returns the hex strings of an advertisement's two public keys. */
export function advertisedKeysHex(advertisement: KeyAdvertisement): string[] {
  return [
    Buffer.from(advertisement.maskPublicKey).toString('hex'),
    Buffer.from(advertisement.sharePublicKey).toString('hex'),
  ];
}

/**
 * Checks the broadcast key list and returns it as a map sorted by vehicle
 * id. All ids and all public keys must be distinct, as a repeated key
 * would let one party pose as two.
 *
 * @throws FleetError MALFORMED_PAYLOAD for a wrong round, malformed key or
 *   repeat; QUORUM_NOT_MET for fewer than threshold entries.
 */
export function checkAdvertisements(
  advertisements: readonly KeyAdvertisement[],
  roundId: string,
  threshold: number,
): Map<string, KeyAdvertisement> {
  const byId = new Map<string, KeyAdvertisement>();
  const keys = new Set<string>();
  for (const advertisement of advertisements) {
    checkAdvertisement(advertisement, roundId);
    const { vehicleId } = advertisement;
    const [maskHex, shareHex] = advertisedKeysHex(advertisement);
    if (byId.has(vehicleId) || keys.has(maskHex) || keys.has(shareHex)) {
      throw protocolViolation(
        `key list of round ${roundId} repeats vehicle ${vehicleId} or ` +
          'one of its public keys',
      );
    }
    byId.set(vehicleId, advertisement);
    keys.add(maskHex).add(shareHex);
  }
  if (byId.size < threshold) {
    throw quorumNotMet(roundId, 'advertise keys', byId.size, threshold);
  }

  const sortedIds = [...byId.keys()].sort();
  return new Map(sortedIds.map((id) => [id, byId.get(id)!]));
}

/** Round state a vehicle checks an unmask request against. */
export interface UnmaskContext {
  roundId: string;
  threshold: number;
  /** Vehicles that completed phase 1 (U2), the responder included. */
  maskingSet: readonly string[];
  responderId: string;
}

function findRepeat(ids: readonly string[]): string | undefined {
  const seen = new Set<string>();
  for (const id of ids) {
    if (seen.has(id)) return id;
    seen.add(id);
  }
  return undefined;
}

/**
 * Checks that an unmask request splits U2 into survivors and dropped
 * vehicles with no vehicle in both lists, so that no vehicle's self-mask
 * secret and mask private key are both revealed.
 *
 * @throws FleetError MALFORMED_PAYLOAD for an invalid split;
 *   QUORUM_NOT_MET for fewer than threshold survivors.
 */
export function checkUnmaskRequest(
  request: UnmaskRequest,
  context: UnmaskContext,
): void {
  const { roundId, threshold, maskingSet, responderId } = context;
  const { survivorIds, droppedIds } = request;

  if (request.roundId !== roundId) {
    throw protocolViolation(
      `unmask request is for round ${request.roundId}; expected ${roundId}`,
    );
  }

  const survivors = new Set(survivorIds);
  const inBoth = droppedIds.find((id) => survivors.has(id));
  if (inBoth !== undefined) {
    throw protocolViolation(
      `unmask request lists vehicle ${inBoth} both as survivor and as ` +
        'dropped; revealing both its secrets would expose its input',
    );
  }

  const repeat = findRepeat([...survivorIds, ...droppedIds]);
  const listed = new Set([...survivorIds, ...droppedIds]);
  const outside = [...listed].find((id) => !maskingSet.includes(id));
  if (
    repeat !== undefined ||
    outside !== undefined ||
    listed.size !== maskingSet.length
  ) {
    throw protocolViolation(
      `unmask request for round ${roundId} does not split the ` +
        `${maskingSet.length} vehicles that shared keys exactly once ` +
        `(repeated: ${repeat ?? 'none'}, unknown: ${outside ?? 'none'})`,
    );
  }

  if (!survivors.has(responderId)) {
    throw protocolViolation(
      `unmask request lists responder ${responderId} as dropped`,
    );
  }
  if (survivors.size < threshold) {
    throw quorumNotMet(roundId, 'masked input', survivors.size, threshold);
  }
}
