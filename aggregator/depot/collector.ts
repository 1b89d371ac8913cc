/**
 * The depot's state of one round: the round task, the updates it accepted
 * and their FedAvg sum, which vehicles have a decision, and the partial
 * once it is sealed. Pure apart from the clock passed in, so every rule
 * can be tested without MQTT.
 */
import { createHash } from 'node:crypto';
import {
  ErrorCode,
  countElements,
  encodeFloat32Tensor,
  type DepotUpdateEntry,
  type PartialAggregate,
  type RoundTask,
  type UpdateAck,
} from '../../protocol/index.ts';
import { TENSOR_SPECS } from '../../models/architecture.ts';
import { compressionOfTask } from '../../protocol/compression/index.ts';
import { FedAvgAccumulator } from '../fedavg.ts';
import { buildAck, truncateText } from '../messages.ts';
import { vehicleAckOf } from './acks.ts';
import {
  validateUpdate,
  type AcceptedUpdate,
  type RejectedUpdate,
  type RoundContext,
} from '../validate.ts';

const SHAPES_BY_NAME = new Map(
  TENSOR_SPECS.map((spec) => [spec.name, spec.shape]),
);

/** Caps an update is validated with, as documented in DepotOptions. */
export interface UpdateCaps {
  maxExamplesPerUpdate: number;
  maxAbsDeltaValue: number;
  maxMessageBytes: number;
}

/** Outcome of {@link DepotRound.judge}. */
export type DepotDecision =
  | AcceptedUpdate
  | RejectedUpdate
  /** Copy of an update already merged, with the fleet's ack once received. */
  | { accepted: 'resent'; updateId: string; outcome: UpdateAck | undefined };

/** Phase of a round: taking updates, waiting for the fleet, or settled. */
export type DepotRoundPhase = 'collecting' | 'forwarded' | 'settled';

/** Sealed partial: the message and its partial id. */
export interface SealedPartial {
  partial: PartialAggregate;
  partialId: string;
}

/**
 * Returns the partial id of `depotId`'s updates `updateIds` in `round`.
 * The same set of ids in any order gives the same partial id, so a
 * restarted depot resends a partial under the id the fleet may have
 * counted it by.
 */
export function partialIdOf(
  depotId: string,
  round: number,
  updateIds: readonly string[],
): string {
  const hash = createHash('sha256');
  hash.update(`${depotId}\n${round}\n`);
  for (const id of [...updateIds].sort()) hash.update(`${id}\n`);
  return `${depotId}-r${round}-${hash.digest('hex').slice(0, 24)}`;
}

/** One round of one depot, from its task to the fleet's ack. */
export class DepotRound {
  readonly task: RoundTask;
  readonly selected: ReadonlySet<string>;
  readonly #depotId: string;
  readonly #caps: UpdateCaps;
  readonly #shapes: Map<string, readonly number[]>;
  readonly #accumulator: FedAvgAccumulator;
  /** Accepted updates by vehicle id. */
  readonly #entries = new Map<string, DepotUpdateEntry>();
  readonly #updateIds = new Set<string>();
  /** Vehicles whose update for this round was accepted or rejected. */
  readonly #decided = new Set<string>();
  #examples = 0;
  #phase: DepotRoundPhase = 'collecting';
  #sealed: SealedPartial | undefined;
  #outcome: UpdateAck | undefined;
  /**
   * True once the forward time passed, so any merged update forwards at once.
   */
  #isPastForwardTime = false;

  constructor(depotId: string, task: RoundTask, caps: UpdateCaps) {
    this.#depotId = depotId;
    this.task = task;
    this.selected = new Set(task.selectedVehicles);
    this.#caps = caps;
    this.#shapes = new Map();
    for (const name of task.training.trainableTensors) {
      const shape = SHAPES_BY_NAME.get(name);
      // An unknown name stays out, so every update fails WRONG_TENSORS.
      if (shape !== undefined) this.#shapes.set(name, shape);
    }
    const sizes = new Map(
      [...this.#shapes].map(([name, shape]) => [name, countElements(shape)]),
    );
    this.#accumulator = new FedAvgAccumulator(sizes);
  }

  get round(): number {
    return this.task.round;
  }

  /**
   * Returns a new round of the same depot, task and caps with nothing
   * merged, for a partial rebuilt without some of the entries.
   */
  emptyCopy(): DepotRound {
    return new DepotRound(this.#depotId, this.task, this.#caps);
  }

  get phase(): DepotRoundPhase {
    return this.#phase;
  }

  /** Tensor names of the task that this model does not have. */
  get unknownTensors(): string[] {
    return this.task.training.trainableTensors.filter(
      (name) => !this.#shapes.has(name),
    );
  }

  /** Accepted updates, sorted by vehicle id. */
  get entries(): DepotUpdateEntry[] {
    // Sorts by UTF-16 code units, the order decodePartialAggregate checks.
    return [...this.#entries.values()].sort((a, b) => {
      if (a.vehicleId === b.vehicleId) return 0;
      return a.vehicleId < b.vehicleId ? -1 : 1;
    });
  }

  get sealed(): SealedPartial | undefined {
    return this.#sealed;
  }

  /** The fleet's ack of the sealed partial, once received. */
  get outcome(): UpdateAck | undefined {
    return this.#outcome;
  }

  /**
   * Round and model version of the task, as the current ones in the depot's own
   * acks.
   */
  get current(): { round: number; modelVersion: number } {
    return { round: this.task.round, modelVersion: this.task.modelVersion };
  }

  /**
   * Decides on `payload` from the update topic of `vehicleId` at `nowMs`,
   * and records the decision: an accepted update is added to the sum. A
   * copy of an update already merged comes back as 'resent'. Once the
   * partial is sealed, an update that would otherwise be accepted is
   * rejected ROUND_CLOSED, because the fleet takes one partial per depot
   * and round.
   */
  judge(vehicleId: string, payload: Uint8Array, nowMs: number): DepotDecision {
    const decision = validateUpdate(vehicleId, payload, this.#contextAt(nowMs));
    const update = decision.update;
    if (
      !decision.accepted &&
      decision.code === ErrorCode.DuplicateUpdate &&
      update !== undefined &&
      this.#updateIds.has(update.updateId)
    ) {
      return {
        accepted: 'resent',
        updateId: update.updateId,
        outcome: this.#outcome,
      };
    }
    if (update?.round === this.round && update.vehicleId === vehicleId) {
      this.#decided.add(vehicleId);
    }
    if (!decision.accepted) return decision;
    if (this.#phase !== 'collecting') {
      return {
        accepted: false,
        code: ErrorCode.RoundClosed,
        reason: truncateText(
          `update ${update!.updateId} is for round ${this.round}, whose ` +
            `partial depot ${this.#depotId} already forwarded; current ` +
            `round is ${this.round}, model version ${this.task.modelVersion}`,
        ),
        update,
      };
    }
    this.#accumulator.add(decision.deltas, decision.update.numExamples);
    this.#examples += decision.update.numExamples;
    this.#updateIds.add(decision.update.updateId);
    this.#entries.set(vehicleId, {
      vehicleId,
      updateId: decision.update.updateId,
      numExamples: decision.update.numExamples,
    });
    return decision;
  }

  /**
   * Returns true when the partial should be forwarded now: at least one update
   * is merged and either every member has a decision or the forward time
   * passed. Members are the selected vehicles seen on the depot broker.
   */
  isReadyToForward(seenVehicles: ReadonlySet<string>): boolean {
    if (this.#phase !== 'collecting' || this.#entries.size === 0) return false;
    if (this.#isPastForwardTime) return true;
    for (const vehicleId of this.selected) {
      const isMember =
        seenVehicles.has(vehicleId) || this.#entries.has(vehicleId);
      if (isMember && !this.#decided.has(vehicleId)) return false;
    }
    return true;
  }

  /** Marks the forward time as passed: the next accepted update forwards. */
  markForwardTimePassed(): void {
    this.#isPastForwardTime = true;
  }

  /**
   * Seals the partial of the accepted updates: later updates are
   * rejected, and the same partial is sent until the fleet acks it.
   *
   * @throws {FleetError} EMPTY_AGGREGATE when no update was accepted.
   * @throws {Error} when the round is already sealed.
   */
  seal(nowMs: number): SealedPartial {
    if (this.#phase !== 'collecting') {
      throw new Error(`round ${this.round} is already ${this.#phase}`);
    }
    const mean = this.#accumulator.result();
    const entries = this.entries;
    const partialId = partialIdOf(
      this.#depotId,
      this.round,
      entries.map((entry) => entry.updateId),
    );
    const partial: PartialAggregate = {
      partialId,
      depotId: this.#depotId,
      modelName: this.task.modelName,
      baseModelVersion: this.task.modelVersion,
      round: this.round,
      updates: entries,
      numExamples: this.#examples,
      meanDeltas: [...this.#shapes].map(([name, shape]) =>
        encodeFloat32Tensor(name, shape, mean.get(name)!),
      ),
      createdAtMs: nowMs,
    };
    this.#phase = 'forwarded';
    this.#sealed = { partial, partialId };
    return this.#sealed;
  }

  /**
   * Records the fleet's ack of the sealed partial and returns the acks of
   * its vehicles' updates, which carry the fleet's status, reason and
   * current round and version. Returns undefined for an ack of another
   * partial, or when the round is not waiting for one.
   */
  settle(
    fleetAck: UpdateAck,
  ): Array<{ vehicleId: string; ack: UpdateAck }> | undefined {
    const sealed = this.#sealed;
    if (this.#phase !== 'forwarded' || sealed === undefined) return undefined;
    if (fleetAck.updateId !== sealed.partialId) return undefined;
    this.#phase = 'settled';
    this.#outcome = fleetAck;
    return this.vehicleAcks();
  }

  /**
   * Returns the acks of the merged updates after the fleet's ack, or [] before
   * it.
   */
  vehicleAcks(): Array<{ vehicleId: string; ack: UpdateAck }> {
    const outcome = this.#outcome;
    if (outcome === undefined) return [];
    return this.entries.map((entry) => ({
      vehicleId: entry.vehicleId,
      ack: vehicleAckOf(entry, this.round, outcome),
    }));
  }

  /**
   * Builds the ack of a rejected update, with this round as the current one.
   */
  rejectionAck(decision: RejectedUpdate): UpdateAck {
    return buildAck(decision, this.current);
  }

  #contextAt(nowMs: number): RoundContext {
    return {
      openRound: nowMs < this.task.deadlineMs ? this.round : undefined,
      lastRound: this.round,
      modelName: this.task.modelName,
      modelVersion: this.task.modelVersion,
      selectedVehicles: this.selected,
      seenUpdateIds: this.#updateIds,
      earlierAccepted: new Map(),
      acceptedVehicles: new Set(this.#entries.keys()),
      acceptedExamples: this.#examples,
      trainableShapes: this.#shapes,
      updateCompression: compressionOfTask(this.task),
      ...this.#caps,
    };
  }
}
