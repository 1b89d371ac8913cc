/**
 * The server's unmasking arithmetic: checks revealed shares, rebuilds
 * secrets from them, and removes the masks that do not cancel in the sum.
 */
import { protocolViolation } from './errors.ts';
import { derivePairwiseMaskSeed, deriveSelfMaskSeed } from './kdf.ts';
import {
  addWordsInPlace,
  expandMask,
  pairwiseMaskSign,
  subtractWordsInPlace,
} from './mask.ts';
import type { KeyAdvertisement, RevealedShare } from './messages.ts';
import {
  combineShares,
  fieldElementToBytes,
  type ShamirShare,
} from './shamir.ts';
import {
  X25519_KEY_BYTES,
  agreeX25519,
  importX25519PrivateKey,
} from './x25519.ts';

/** Round parameters every reconstruction needs. */
export interface UnmaskRound {
  roundId: string;
  threshold: number;
}

/** Server state about one dropped vehicle. */
export interface DroppedVehicle {
  droppedId: string;
  /** Revealed shares of its mask private key. */
  shares: readonly ShamirShare[];
  /** The broadcast key list (U1), by vehicle id. */
  advertisements: ReadonlyMap<string, KeyAdvertisement>;
  /** Vehicles whose masked input is in the sum (U3). */
  survivorIds: readonly string[];
}

/**
 * Checks that a response reveals shares for exactly `expectedOwners`, all
 * at the responder's own point x.
 *
 * @throws FleetError MALFORMED_PAYLOAD otherwise.
 */
export function checkRevealed(
  revealed: readonly RevealedShare[],
  expectedOwners: readonly string[],
  x: number,
  responderId: string,
): void {
  const owners = revealed.map((item) => item.ownerId).sort();
  const isExact =
    owners.length === expectedOwners.length &&
    owners.every((id, i) => id === expectedOwners[i]);
  const isAtOwnPoint = revealed.every((item) => item.share.x === x);
  if (!isExact || !isAtOwnPoint) {
    throw protocolViolation(
      `unmask response of vehicle ${responderId} reveals shares for ` +
        `[${owners.join(', ')}]; expected [${expectedOwners.join(', ')}] ` +
        `at point x = ${x}`,
    );
  }
}

/**
 * Rebuilds a 32-byte secret. With more than `threshold` shares it also
 * interpolates the last `threshold` and compares, so that one wrong share
 * is detected unless exactly `threshold` shares arrived.
 */
function reconstructBytes(
  shares: readonly ShamirShare[],
  threshold: number,
  ownerId: string,
): Uint8Array {
  const value = combineShares(shares, threshold);
  const hasSpare = shares.length > threshold;
  if (
    hasSpare &&
    combineShares(shares.slice(-threshold), threshold) !== value
  ) {
    throw protocolViolation(
      `revealed shares of vehicle ${ownerId} are inconsistent; at least ` +
        'one is wrong',
    );
  }
  try {
    return fieldElementToBytes(value, X25519_KEY_BYTES);
  } catch (err) {
    throw protocolViolation(
      `secret of vehicle ${ownerId} reconstructs to more than 32 bytes; ` +
        'a revealed share is wrong',
      err,
    );
  }
}

/**
 * Rebuilds a dropped vehicle's mask private key and removes from `sumWords`
 * the pairwise mask each survivor applied for it.
 *
 * @throws FleetError MALFORMED_PAYLOAD when the rebuilt key does not match
 *   the advertised public key, which means a revealed share is wrong.
 */
export function removePairwiseMasks(
  sumWords: Uint32Array,
  round: UnmaskRound,
  dropped: DroppedVehicle,
): void {
  const { droppedId, advertisements } = dropped;
  const raw = reconstructBytes(dropped.shares, round.threshold, droppedId);
  const keys = importX25519PrivateKey(raw);
  const advertised = advertisements.get(droppedId)!.maskPublicKey;
  if (!Buffer.from(keys.publicKey).equals(advertised)) {
    throw protocolViolation(
      `reconstructed mask key of vehicle ${droppedId} does not match its ` +
        'advertised public key; a revealed share is wrong',
    );
  }

  for (const survivorId of dropped.survivorIds) {
    const peerKey = advertisements.get(survivorId)!.maskPublicKey;
    const secret = agreeX25519(keys.privateKey, peerKey);
    const seed = derivePairwiseMaskSeed(
      secret,
      round.roundId,
      survivorId,
      droppedId,
    );
    const mask = expandMask(seed, sumWords.length);
    // The survivor added the mask when the dropped id sorts after its own.
    if (pairwiseMaskSign(survivorId, droppedId) > 0) {
      subtractWordsInPlace(sumWords, mask);
    } else {
      addWordsInPlace(sumWords, mask);
    }
  }
}

/**
 * Rebuilds a survivor's self-mask secret b_u and removes its self mask
 * from `sumWords`.
 *
 * NOTE: b_u has no public commitment, so with exactly `threshold` shares a
 * wrong share corrupts the sum without an error. Spare shares are
 * cross-checked.
 */
export function removeSelfMask(
  sumWords: Uint32Array,
  round: UnmaskRound,
  survivorId: string,
  shares: readonly ShamirShare[],
): void {
  const secret = reconstructBytes(shares, round.threshold, survivorId);
  const seed = deriveSelfMaskSeed(secret, round.roundId, survivorId);
  subtractWordsInPlace(sumWords, expandMask(seed, sumWords.length));
}
