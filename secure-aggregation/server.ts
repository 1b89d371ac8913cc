/**
 * The server side of one secure aggregation round (Bonawitz et al., CCS
 * 2017, honest-but-curious form). The server collects and broadcasts
 * public keys, routes encrypted shares it cannot read, and adds the masked
 * inputs into one running sum. At the end it removes the masks that do not
 * cancel. Those are the pairwise masks between survivors and vehicles that
 * dropped before sending their input, and the survivors' self masks.
 */
import { ErrorCode, FleetError } from '../protocol/index.ts';
import { protocolViolation, quorumNotMet } from './errors.ts';
import { addWordsInPlace } from './mask.ts';
import type {
  EncryptedShare,
  KeyAdvertisement,
  MaskedInput,
  UnmaskRequest,
  UnmaskResponse,
} from './messages.ts';
import {
  advertisedKeysHex,
  checkAdvertisement,
  checkAdvertisements,
  checkRoundOptions,
} from './round-checks.ts';
import type { ShamirShare } from './shamir.ts';
import {
  checkRevealed,
  removePairwiseMasks,
  removeSelfMask,
} from './unmasking.ts';

type ServerPhase = 'advertise' | 'share' | 'mask' | 'unmask' | 'done';

/** Options of the server for one round. */
export interface SecAggServerOptions {
  roundId: string;
  /** Shares needed to reconstruct a secret; at least 2. */
  threshold: number;
  /** Words in every masked input. */
  vectorLength: number;
  /** Vehicles selected for the round; when absent, any id may join. */
  vehicleIds?: readonly string[];
}

/** Result of a round: the modular sum of the survivors' quantized inputs. */
export interface SecureAggregate {
  sumWords: Uint32Array;
  /** Vehicles whose input is in the sum (U3), sorted. */
  survivorIds: string[];
  /** Vehicles that shared keys but sent no input (U2 minus U3), sorted. */
  droppedIds: string[];
  /** Survivors that responded to the unmask request, sorted. */
  responderIds: string[];
}

/**
 * The server's state machine for one secure aggregation round. A receive
 * method that throws rejects that one message and the round goes on; a
 * close method or `finish` that throws QUORUM_NOT_MET fails the round.
 */
export class SecAggServer {
  readonly roundId: string;
  readonly threshold: number;
  readonly vectorLength: number;
  readonly #selected: ReadonlySet<string> | null;
  #phase: ServerPhase = 'advertise';
  #advertisements = new Map<string, KeyAdvertisement>();
  #advertisedKeys = new Set<string>();
  #sharesBySender = new Map<string, EncryptedShare[]>();
  #maskedSum: Uint32Array;
  #survivorIds = new Set<string>();
  #request: UnmaskRequest | null = null;
  #selfMaskShares = new Map<string, ShamirShare[]>();
  #maskKeyShares = new Map<string, ShamirShare[]>();
  #responderIds: string[] = [];

  /** @throws RangeError or TypeError for invalid options. */
  constructor(options: SecAggServerOptions) {
    checkRoundOptions(options.roundId, options.threshold);
    const { vectorLength } = options;
    if (!Number.isInteger(vectorLength) || vectorLength < 1) {
      throw new RangeError(
        `vectorLength is ${vectorLength}; expected a positive integer`,
      );
    }
    this.roundId = options.roundId;
    this.threshold = options.threshold;
    this.vectorLength = vectorLength;
    this.#selected = options.vehicleIds ? new Set(options.vehicleIds) : null;
    this.#maskedSum = new Uint32Array(vectorLength);
  }

  #checkPhase(expected: ServerPhase, step: string): void {
    if (this.#phase !== expected) {
      throw protocolViolation(
        `server of round ${this.roundId} cannot ${step} in phase ` +
          `${this.#phase}; expected phase ${expected}`,
      );
    }
  }

  #checkSender(roundId: string, vehicleId: string, known: boolean): void {
    if (roundId !== this.roundId) {
      throw new FleetError(
        ErrorCode.WrongRound,
        `message from vehicle ${vehicleId} is for round ${roundId}; the ` +
          `open round is ${this.roundId}`,
      );
    }
    if (!known) {
      throw new FleetError(
        ErrorCode.VehicleNotSelected,
        `vehicle ${vehicleId} is not part of this phase of round ${this.roundId}`,
      );
    }
  }

  #duplicate(vehicleId: string, what: string): FleetError {
    return new FleetError(
      ErrorCode.DuplicateUpdate,
      `vehicle ${vehicleId} sent its ${what} for round ${this.roundId} twice`,
    );
  }

  /**
   * Phase 0: stores a vehicle's public keys. Rejects a key that another
   * vehicle already advertised, so one vehicle cannot make the key list
   * invalid for all.
   */
  receiveAdvertisement(advertisement: KeyAdvertisement): void {
    this.#checkPhase('advertise', 'accept key advertisements');
    const { vehicleId } = advertisement;
    const isSelected = this.#selected?.has(vehicleId) ?? true;
    this.#checkSender(advertisement.roundId, vehicleId, isSelected);
    if (this.#advertisements.has(vehicleId)) {
      throw this.#duplicate(vehicleId, 'key advertisement');
    }
    checkAdvertisement(advertisement, this.roundId);
    const keys = advertisedKeysHex(advertisement);
    if (keys.some((key) => this.#advertisedKeys.has(key))) {
      throw protocolViolation(
        `vehicle ${vehicleId} advertised a public key that another ` +
          `vehicle of round ${this.roundId} already uses`,
      );
    }

    this.#advertisements.set(vehicleId, advertisement);
    for (const key of keys) this.#advertisedKeys.add(key);
  }

  /**
   * Ends phase 0 and returns the key list to broadcast (U1), sorted by id.
   *
   * @throws FleetError QUORUM_NOT_MET below threshold, MALFORMED_PAYLOAD
   *   for a malformed or repeated key.
   */
  closeAdvertising(): KeyAdvertisement[] {
    this.#checkPhase('advertise', 'close advertising');
    const sorted = checkAdvertisements(
      [...this.#advertisements.values()],
      this.roundId,
      this.threshold,
    );
    this.#advertisements = sorted;
    this.#phase = 'share';
    return [...sorted.values()];
  }

  /**
   * Phase 1: stores a vehicle's encrypted shares, which must address every
   * other vehicle of U1 exactly once.
   */
  receiveShares(senderId: string, shares: readonly EncryptedShare[]): void {
    this.#checkPhase('share', 'accept shares');
    this.#checkSender(
      this.roundId,
      senderId,
      this.#advertisements.has(senderId),
    );
    if (this.#sharesBySender.has(senderId)) {
      throw this.#duplicate(senderId, 'shares');
    }
    const recipients = new Set<string>();
    for (const share of shares) {
      this.#checkSender(share.roundId, senderId, true);
      const isPeer =
        this.#advertisements.has(share.recipientId) &&
        share.recipientId !== senderId;
      if (
        share.senderId !== senderId ||
        !isPeer ||
        recipients.has(share.recipientId)
      ) {
        throw protocolViolation(
          `vehicle ${senderId} sent a share from ${share.senderId} to ` +
            `${share.recipientId}; expected itself as sender and each ` +
            'other vehicle once as recipient',
        );
      }
      recipients.add(share.recipientId);
    }
    if (recipients.size !== this.#advertisements.size - 1) {
      throw protocolViolation(
        `vehicle ${senderId} sent ${recipients.size} shares; expected one ` +
          `for each of the other ${this.#advertisements.size - 1} vehicles`,
      );
    }
    this.#sharesBySender.set(senderId, [...shares]);
  }

  /**
   * Ends phase 1 and returns, for each vehicle that shared keys (U2), the
   * shares addressed to it by the other members of U2.
   *
   * @throws FleetError QUORUM_NOT_MET when fewer than threshold vehicles
   *   shared keys.
   */
  closeSharing(): Map<string, EncryptedShare[]> {
    this.#checkPhase('share', 'close sharing');
    const senders = [...this.#sharesBySender.keys()].sort();
    if (senders.length < this.threshold) {
      throw quorumNotMet(
        this.roundId,
        'share keys',
        senders.length,
        this.threshold,
      );
    }

    const routed = new Map<string, EncryptedShare[]>(
      senders.map((id) => [id, []]),
    );
    for (const sender of senders) {
      for (const share of this.#sharesBySender.get(sender)!) {
        routed.get(share.recipientId)?.push(share);
      }
    }
    this.#phase = 'mask';
    return routed;
  }

  /** Phase 2: adds a vehicle's masked input to the running sum. */
  receiveMaskedInput(input: MaskedInput): void {
    this.#checkPhase('mask', 'accept masked inputs');
    const { vehicleId, maskedWords } = input;
    this.#checkSender(
      input.roundId,
      vehicleId,
      this.#sharesBySender.has(vehicleId),
    );
    if (this.#survivorIds.has(vehicleId)) {
      throw this.#duplicate(vehicleId, 'masked input');
    }
    if (
      !(maskedWords instanceof Uint32Array) ||
      maskedWords.length !== this.vectorLength
    ) {
      throw new FleetError(
        ErrorCode.WrongShape,
        `masked input of vehicle ${vehicleId} has ${maskedWords?.length} ` +
          `words; expected a Uint32Array of ${this.vectorLength}`,
      );
    }
    addWordsInPlace(this.#maskedSum, maskedWords);
    this.#survivorIds.add(vehicleId);
  }

  /**
   * Ends phase 2 and returns the unmask request for the survivors.
   *
   * @throws FleetError QUORUM_NOT_MET when fewer than threshold vehicles
   *   sent a masked input.
   */
  closeMaskedInput(): UnmaskRequest {
    this.#checkPhase('mask', 'close masked input');
    const survivorIds = [...this.#survivorIds].sort();
    if (survivorIds.length < this.threshold) {
      throw quorumNotMet(
        this.roundId,
        'masked input',
        survivorIds.length,
        this.threshold,
      );
    }
    const droppedIds = [...this.#sharesBySender.keys()]
      .filter((id) => !this.#survivorIds.has(id))
      .sort();
    this.#request = { roundId: this.roundId, survivorIds, droppedIds };
    this.#phase = 'unmask';
    return {
      roundId: this.roundId,
      survivorIds: [...survivorIds],
      droppedIds: [...droppedIds],
    };
  }

  /**
   * Phase 3: stores a survivor's revealed shares: self-mask shares for
   * exactly the survivors, mask-key shares for exactly the dropped
   * vehicles, each at the responder's own point x.
   */
  receiveUnmaskResponse(response: UnmaskResponse): void {
    this.#checkPhase('unmask', 'accept unmask responses');
    const { vehicleId } = response;
    this.#checkSender(
      response.roundId,
      vehicleId,
      this.#survivorIds.has(vehicleId),
    );
    if (this.#responderIds.includes(vehicleId)) {
      throw this.#duplicate(vehicleId, 'unmask response');
    }
    const { survivorIds, droppedIds } = this.#request!;
    const x = [...this.#advertisements.keys()].indexOf(vehicleId) + 1;
    checkRevealed(response.selfMaskShares, survivorIds, x, vehicleId);
    checkRevealed(response.maskKeyShares, droppedIds, x, vehicleId);

    for (const { ownerId, share } of response.selfMaskShares) {
      appendShare(this.#selfMaskShares, ownerId, share);
    }
    for (const { ownerId, share } of response.maskKeyShares) {
      appendShare(this.#maskKeyShares, ownerId, share);
    }
    this.#responderIds.push(vehicleId);
  }

  /**
   * Ends the round: reconstructs each dropped vehicle's mask private key
   * and each survivor's self-mask secret, removes the masks, and returns
   * the modular sum of the survivors' quantized inputs.
   *
   * @throws FleetError QUORUM_NOT_MET when fewer than threshold survivors
   *   responded, MALFORMED_PAYLOAD when a reconstructed key does not match
   *   the advertised public key (a wrong share).
   */
  finish(): SecureAggregate {
    this.#checkPhase('unmask', 'finish');
    const responderCount = this.#responderIds.length;
    if (responderCount < this.threshold) {
      throw quorumNotMet(
        this.roundId,
        'unmask',
        responderCount,
        this.threshold,
      );
    }
    const { survivorIds, droppedIds } = this.#request!;
    const revealedBoth = survivorIds.find((id) => this.#maskKeyShares.has(id));
    if (revealedBoth !== undefined) {
      throw protocolViolation(
        `shares of both secrets of vehicle ${revealedBoth} were revealed`,
      );
    }

    const sumWords = this.#maskedSum;
    const round = { roundId: this.roundId, threshold: this.threshold };
    for (const droppedId of droppedIds) {
      removePairwiseMasks(sumWords, round, {
        droppedId,
        shares: this.#maskKeyShares.get(droppedId)!,
        advertisements: this.#advertisements,
        survivorIds,
      });
    }
    for (const survivorId of survivorIds) {
      const shares = this.#selfMaskShares.get(survivorId)!;
      removeSelfMask(sumWords, round, survivorId, shares);
    }
    this.#phase = 'done';
    return {
      sumWords,
      survivorIds: [...survivorIds],
      droppedIds: [...droppedIds],
      responderIds: [...this.#responderIds].sort(),
    };
  }
}

function appendShare(
  target: Map<string, ShamirShare[]>,
  ownerId: string,
  share: ShamirShare,
): void {
  const list = target.get(ownerId);
  if (list) list.push(share);
  else target.set(ownerId, [share]);
}
