/**
 * The vehicle side of one secure aggregation round, after Bonawitz et al.,
 * "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
 * (CCS 2017), in its honest-but-curious form: advertise keys, share keys,
 * send the masked input, reveal shares for unmasking. One instance serves
 * one round and its keys never leave it except as Shamir shares.
 */
import { randomBytes } from 'node:crypto';
import { protocolViolation, quorumNotMet } from './errors.ts';
import { derivePairwiseMaskSeed, deriveSelfMaskSeed } from './kdf.ts';
import {
  addWordsInPlace,
  expandMask,
  pairwiseMaskSign,
  subtractWordsInPlace,
} from './mask.ts';
import type {
  EncryptedShare,
  KeyAdvertisement,
  MaskedInput,
  RevealedShare,
  UnmaskRequest,
  UnmaskResponse,
} from './messages.ts';
import {
  checkAdvertisements,
  checkRoundOptions,
  checkUnmaskRequest,
} from './round-checks.ts';
import {
  decryptShareBundle,
  encryptShareBundle,
  type ShareBundle,
} from './share-encryption.ts';
import { bytesToFieldElement, splitSecret } from './shamir.ts';
import {
  agreeX25519,
  exportX25519PrivateKey,
  generateX25519KeyPair,
  type X25519KeyPair,
} from './x25519.ts';

type VehiclePhase =
  'new' | 'advertised' | 'shared' | 'masked' | 'unmasked' | 'aborted';

/** Options of one vehicle's participation in one round. */
export interface SecAggVehicleOptions {
  vehicleId: string;
  roundId: string;
  /** Shares needed to reconstruct a secret; at least 2. */
  threshold: number;
}

/**
 * One vehicle's state machine for one secure aggregation round. A method
 * that throws a FleetError moves the vehicle to phase `aborted`, where it
 * rejects every later call, as the protocol aborts on any inconsistency.
 */
export class SecAggVehicle {
  readonly vehicleId: string;
  readonly roundId: string;
  readonly threshold: number;
  #phase: VehiclePhase = 'new';
  #maskKeys: X25519KeyPair | null = null;
  #shareKeys: X25519KeyPair | null = null;
  /** Public keys of the vehicles that advertised (U1), by id. */
  #peers = new Map<string, KeyAdvertisement>();
  #selfMaskSeed: Uint8Array | null = null;
  #ownBundle: ShareBundle | null = null;
  /** Decrypted shares from each vehicle that shared keys (U2 minus self). */
  #receivedBundles = new Map<string, ShareBundle>();
  /** Vehicles that completed phase 1 (U2), including this one, sorted. */
  #maskingSet: string[] = [];

  /** @throws RangeError or TypeError for invalid options. */
  constructor(options: SecAggVehicleOptions) {
    checkRoundOptions(options.roundId, options.threshold);
    if (typeof options.vehicleId !== 'string' || options.vehicleId === '') {
      throw new TypeError('vehicleId must be a non-empty string');
    }
    this.vehicleId = options.vehicleId;
    this.roundId = options.roundId;
    this.threshold = options.threshold;
  }

  /** Checks the phase; the step sets the next phase when it succeeds. */
  #beginStep(expected: VehiclePhase, step: string): void {
    if (this.#phase !== expected) {
      throw protocolViolation(
        `vehicle ${this.vehicleId} cannot ${step} in phase ${this.#phase} ` +
          `of round ${this.roundId}; expected phase ${expected}`,
      );
    }
    this.#phase = 'aborted';
  }

  /** Phase 0: generates the round's two key pairs and advertises them. */
  advertiseKeys(): KeyAdvertisement {
    this.#beginStep('new', 'advertise keys');
    this.#maskKeys = generateX25519KeyPair();
    this.#shareKeys = generateX25519KeyPair();
    this.#phase = 'advertised';
    return {
      roundId: this.roundId,
      vehicleId: this.vehicleId,
      maskPublicKey: this.#maskKeys.publicKey,
      sharePublicKey: this.#shareKeys.publicKey,
    };
  }

  /**
   * Phase 1: checks the broadcast key list, draws the self-mask secret b_u,
   * splits it and the mask private key into shares with threshold t, one
   * per advertised vehicle (x = 1 + position in id order), and encrypts
   * each share for its recipient. Keeps its own share.
   *
   * @throws FleetError QUORUM_NOT_MET when fewer than threshold vehicles
   *   advertised, MALFORMED_PAYLOAD when the list is inconsistent or omits
   *   or alters this vehicle's keys.
   */
  shareKeys(advertisements: readonly KeyAdvertisement[]): EncryptedShare[] {
    this.#beginStep('advertised', 'share keys');
    const maskKeys = this.#maskKeys!;
    const shareKeys = this.#shareKeys!;
    const peers = checkAdvertisements(
      advertisements,
      this.roundId,
      this.threshold,
    );
    const own = peers.get(this.vehicleId);
    if (
      own === undefined ||
      !Buffer.from(own.maskPublicKey).equals(maskKeys.publicKey) ||
      !Buffer.from(own.sharePublicKey).equals(shareKeys.publicKey)
    ) {
      throw protocolViolation(
        `key list of round ${this.roundId} omits or alters the keys of ` +
          `vehicle ${this.vehicleId}`,
      );
    }
    this.#peers = peers;

    const ids = [...peers.keys()];
    const xs = ids.map((_, index) => index + 1);
    const selfMaskSecret = randomBytes(32);
    const maskKey = exportX25519PrivateKey(maskKeys.privateKey);
    const maskKeyShares = splitSecret(
      bytesToFieldElement(maskKey),
      this.threshold,
      xs,
    );
    const selfMaskShares = splitSecret(
      bytesToFieldElement(selfMaskSecret),
      this.threshold,
      xs,
    );
    this.#selfMaskSeed = deriveSelfMaskSeed(
      selfMaskSecret,
      this.roundId,
      this.vehicleId,
    );

    const shares: EncryptedShare[] = [];
    ids.forEach((recipientId, index) => {
      const bundle: ShareBundle = {
        x: xs[index],
        maskKeyShare: maskKeyShares[index].y,
        selfMaskShare: selfMaskShares[index].y,
      };
      if (recipientId === this.vehicleId) {
        this.#ownBundle = bundle;
        return;
      }
      const address = {
        roundId: this.roundId,
        senderId: this.vehicleId,
        recipientId,
      };
      const recipientKey = peers.get(recipientId)!.sharePublicKey;
      shares.push(
        encryptShareBundle(bundle, address, shareKeys.privateKey, recipientKey),
      );
    });
    this.#phase = 'shared';
    return shares;
  }

  /**
   * Phase 2: decrypts the shares routed to this vehicle, whose senders
   * form U2, the vehicles that shared keys. Returns the quantized update
   * plus the self mask plus one pairwise mask for each other vehicle v in
   * U2: added when v sorts after this vehicle, subtracted otherwise. Does
   * not modify `quantizedUpdate`.
   *
   * @throws FleetError DIGEST_MISMATCH for a share that fails
   *   authentication, MALFORMED_PAYLOAD for a misaddressed or repeated
   *   share, QUORUM_NOT_MET when fewer than threshold vehicles shared keys.
   */
  maskInput(
    routedShares: readonly EncryptedShare[],
    quantizedUpdate: Uint32Array,
  ): MaskedInput {
    if (!(quantizedUpdate instanceof Uint32Array)) {
      throw new TypeError('quantizedUpdate must be a Uint32Array');
    }
    this.#beginStep('shared', 'mask its input');
    this.#receiveShares(routedShares);
    const maskingSet = [this.vehicleId, ...this.#receivedBundles.keys()].sort();
    if (maskingSet.length < this.threshold) {
      throw quorumNotMet(
        this.roundId,
        'share keys',
        maskingSet.length,
        this.threshold,
      );
    }
    this.#maskingSet = maskingSet;

    const maskedWords = Uint32Array.from(quantizedUpdate);
    const length = maskedWords.length;
    addWordsInPlace(maskedWords, expandMask(this.#selfMaskSeed!, length));
    const maskPrivateKey = this.#maskKeys!.privateKey;
    for (const peerId of maskingSet) {
      if (peerId === this.vehicleId) continue;
      const peerKey = this.#peers.get(peerId)!.maskPublicKey;
      const secret = agreeX25519(maskPrivateKey, peerKey);
      const seed = derivePairwiseMaskSeed(
        secret,
        this.roundId,
        this.vehicleId,
        peerId,
      );
      const mask = expandMask(seed, length);
      if (pairwiseMaskSign(this.vehicleId, peerId) > 0) {
        addWordsInPlace(maskedWords, mask);
      } else {
        subtractWordsInPlace(maskedWords, mask);
      }
    }
    this.#phase = 'masked';
    return { roundId: this.roundId, vehicleId: this.vehicleId, maskedWords };
  }

  #receiveShares(routedShares: readonly EncryptedShare[]): void {
    const sharePrivateKey = this.#shareKeys!.privateKey;
    for (const share of routedShares) {
      const { senderId } = share;
      const sender = this.#peers.get(senderId);
      if (
        share.roundId !== this.roundId ||
        share.recipientId !== this.vehicleId ||
        sender === undefined ||
        senderId === this.vehicleId ||
        this.#receivedBundles.has(senderId)
      ) {
        throw protocolViolation(
          `vehicle ${this.vehicleId} received a misaddressed or repeated ` +
            `share from ${senderId} to ${share.recipientId} for round ` +
            `${share.roundId}`,
        );
      }
      const bundle = decryptShareBundle(
        share,
        sharePrivateKey,
        sender.sharePublicKey,
      );
      if (bundle.x !== this.#ownBundle!.x) {
        throw protocolViolation(
          `share from ${senderId} is for point x = ${bundle.x}, but ` +
            `vehicle ${this.vehicleId} holds x = ${this.#ownBundle!.x}`,
        );
      }
      this.#receivedBundles.set(senderId, bundle);
    }
  }

  /**
   * Phase 3: reveals this vehicle's share of b_v for each survivor v
   * (itself included) and of s_v^SK for each dropped v. Considers one
   * request per round, so the server never obtains both secrets of one
   * vehicle from this vehicle.
   *
   * @throws FleetError MALFORMED_PAYLOAD when the request lists a vehicle
   *   both as survivor and as dropped, does not split U2 exactly, omits
   *   this vehicle from the survivors, or comes after an earlier request;
   *   QUORUM_NOT_MET when it names fewer than threshold survivors.
   */
  unmask(request: UnmaskRequest): UnmaskResponse {
    this.#beginStep('masked', 'answer an unmask request');
    checkUnmaskRequest(request, {
      roundId: this.roundId,
      threshold: this.threshold,
      maskingSet: this.#maskingSet,
      responderId: this.vehicleId,
    });

    const bundleOf = (id: string): ShareBundle =>
      id === this.vehicleId ? this.#ownBundle! : this.#receivedBundles.get(id)!;
    const selfMaskShares: RevealedShare[] = request.survivorIds.map((id) => ({
      ownerId: id,
      share: { x: bundleOf(id).x, y: bundleOf(id).selfMaskShare },
    }));
    const maskKeyShares: RevealedShare[] = request.droppedIds.map((id) => ({
      ownerId: id,
      share: { x: bundleOf(id).x, y: bundleOf(id).maskKeyShare },
    }));
    this.#phase = 'unmasked';
    return {
      roundId: this.roundId,
      vehicleId: this.vehicleId,
      selfMaskShares,
      maskKeyShares,
    };
  }
}
