import type { WeightMap } from '../models/architecture.ts';
import { FedAvgAccumulator } from './fedavg.ts';
import {
  STALENESS_WEIGHT_SCALE,
  stalenessWeight,
  type ResolvedAsyncBuffer,
} from './async-options.ts';
import { ClippedSum } from './privacy-round.ts';
import type { VehicleUpdate } from './strategies/index.ts';
import {
  acceptedKeyOf,
  type RejectedUpdate,
  type RoundContext,
  type UpdateDecision,
} from './validate.ts';

/**
 * Rejected depot partials one round remembers by key, so that a resend
 * counts as one rejection. Past it every rejection counts, which keeps
 * the memory of a round with many bad partial ids bounded.
 */
const MAX_REJECTED_PARTIALS = 1_000;

/**
 * Reason a round stopped taking updates. 'all-responded' means every
 * selected vehicle has an accepted update, 'buffer-full' that an
 * asynchronous round has its bufferSize accepted updates.
 */
export type CloseTrigger =
  'all-responded' | 'buffer-full' | 'deadline' | 'stopped';

/** Asynchronous mode settings a round needs. */
export type AsyncRoundSettings = ResolvedAsyncBuffer;

/** Counts of one round, for logs and the round events. */
export interface RoundStats {
  round: number;
  /** Model version the round trained from. */
  baseModelVersion: number;
  selected: string[];
  accepted: number;
  /** Rejected update messages, including repeats from one vehicle. */
  rejected: number;
  rejectedByReason: Record<string, number>;
  /** Bytes of every update message received while the round was open. */
  uplinkBytes: number;
  /** Sum of numExamples over accepted updates. */
  numExamples: number;
  /** Vehicles with an accepted update. */
  numVehicles: number;
  /**
   * Depot partials counted (see OpenRound.recordPartial). Each of their
   * vehicles also counts in `accepted`, `numExamples` and `numVehicles`.
   * OpenRound.stats() always sets it.
   */
  partials?: number;
  durationMs: number;
}

/** A depot's partial that passed every check, as a round counts it. */
export interface CountedPartial {
  /** Depot id and partial id, unique per round. */
  key: string;
  /** The vehicles' updates it merged. */
  entries: ReadonlyArray<{ vehicleId: string; updateId: string }>;
  /** Sum of the entries' numExamples, its FedAvg weight. */
  numExamples: number;
  /** Example-weighted mean of the entries' deltas. */
  meanDeltas: WeightMap;
}

/** Round-independent part of the validation context. */
export type FleetContext = Pick<
  RoundContext,
  | 'lastRound'
  | 'modelName'
  | 'trainableShapes'
  | 'maxMessageBytes'
  | 'maxExamplesPerUpdate'
  | 'maxAbsDeltaValue'
  | 'earlierAccepted'
  | 'vehicleKeys'
>;

/**
 * State of one open round: who was selected, whose update was accepted,
 * and the FedAvg sum of accepted deltas. The round closes when every
 * selected vehicle has an accepted update, at its deadline, or on
 * `close('stopped')`. A rejected update does not count as the vehicle's
 * response, because anyone on the broker can publish on a vehicle's topic.
 */
export class OpenRound {
  readonly round: number;
  readonly baseModelVersion: number;
  readonly selected: ReadonlySet<string>;
  readonly openedAtMs: number;
  readonly deadlineMs: number;
  readonly accumulator: FedAvgAccumulator;
  /** Resolves once with the trigger that closed the round. */
  readonly closed: Promise<CloseTrigger>;

  readonly #seenUpdateIds = new Set<string>();
  readonly #acceptedVehicles = new Set<string>();
  /** acceptedKeyOf of every accepted update. */
  readonly #acceptedKeys = new Set<string>();
  readonly #rejectedByReason: Record<string, number> = {};
  /** Update ids of each counted depot partial's entries, by its key. */
  readonly #countedPartials = new Map<string, readonly string[]>();
  /** Reason code of each rejected depot partial, by its key. */
  readonly #rejectedPartials = new Map<string, string>();
  readonly #keptUpdates: VehicleUpdate[] | undefined;
  readonly #clippedSum: ClippedSum | undefined;
  #accepted = 0;
  /** Asynchronous mode settings; undefined for synchronous rounds. */
  readonly #asyncBuffer: AsyncRoundSettings | undefined;
  /** Sum of the accepted updates' numExamples, before any weighting. */
  #examples = 0;
  /** Mean delta and examples of a secure round, once unmasked. */
  #secureMean: WeightMap | undefined;
  #secureExamples: number | undefined;
  #rejected = 0;
  #uplinkBytes = 0;
  #isOpen = true;
  #resolveClosed!: (trigger: CloseTrigger) => void;
  #deadlineTimer: NodeJS.Timeout;

  constructor(options: {
    round: number;
    baseModelVersion: number;
    selected: readonly string[];
    tensorSizes: ReadonlyMap<string, number>;
    timeoutMs: number;
    nowMs?: number;
    /**
     * Also keep every accepted update's deltas, for the robust rules
     * that need the whole round at once. It costs n x the trainable
     * tensors' size in memory, which streaming FedAvg does not need.
     */
    keepUpdates?: boolean;
    /**
     * DP-FedAvg: also clip every accepted update to this L2 norm and sum
     * it with weight 1 (see `clippedSum`).
     */
    clipNorm?: number;
    /**
     * Asynchronous mode: accept updates trained from up to maxStaleness
     * versions back, weight them by (1 + lag)^-exponent, and close after
     * bufferSize accepted updates.
     */
    asyncBuffer?: AsyncRoundSettings;
  }) {
    this.round = options.round;
    this.baseModelVersion = options.baseModelVersion;
    this.selected = new Set(options.selected);
    this.openedAtMs = options.nowMs ?? Date.now();
    this.deadlineMs = this.openedAtMs + options.timeoutMs;
    this.accumulator = new FedAvgAccumulator(options.tensorSizes);
    this.#keptUpdates = options.keepUpdates === true ? [] : undefined;
    this.#asyncBuffer = options.asyncBuffer;
    this.#clippedSum =
      options.clipNorm === undefined
        ? undefined
        : new ClippedSum(options.tensorSizes, options.clipNorm);
    this.closed = new Promise((resolve) => {
      this.#resolveClosed = resolve;
    });
    this.#deadlineTimer = setTimeout(
      () => this.close('deadline'),
      options.timeoutMs,
    );
    if (this.selected.size === 0 && this.#asyncBuffer === undefined) {
      this.close('all-responded');
    }
  }

  get isOpen(): boolean {
    return this.#isOpen;
  }

  get acceptedCount(): number {
    return this.#accepted;
  }

  /**
   * Accepted updates in arrival order, or undefined when the round was
   * opened without `keepUpdates`.
   */
  get keptUpdates(): readonly VehicleUpdate[] | undefined {
    return this.#keptUpdates;
  }

  /** Clipped equal-weight sum, or undefined when opened without clipNorm. */
  get clippedSum(): ClippedSum | undefined {
    return this.#clippedSum;
  }

  /** Validation context for an update arriving now. */
  contextFor(fleet: FleetContext): RoundContext {
    return {
      ...fleet,
      openRound: this.#isOpen ? this.round : undefined,
      modelVersion: this.baseModelVersion,
      selectedVehicles: this.selected,
      seenUpdateIds: this.#seenUpdateIds,
      acceptedVehicles:
        this.#asyncBuffer === undefined
          ? this.#acceptedVehicles
          : this.#acceptedKeys,
      acceptedExamples: this.#examples,
      maxStaleness: this.#asyncBuffer?.maxStaleness,
    };
  }

  /**
   * Counts one decided update of `bytes`, adds accepted deltas to the
   * FedAvg sum, and closes the round once every selected vehicle has an
   * accepted update. After a rejection the vehicle may still send a valid
   * update until the deadline.
   */
  record(bytes: number, decision: UpdateDecision): void {
    this.#uplinkBytes += bytes;
    if (!decision.accepted) {
      this.#rejected += 1;
      this.#rejectedByReason[decision.code] =
        (this.#rejectedByReason[decision.code] ?? 0) + 1;
      return;
    }

    const { vehicleId, numExamples } = decision.update;
    this.accumulator.queue(decision.deltas, this.#weightOf(decision.update));
    this.#examples += numExamples;
    this.#clippedSum?.add(decision.deltas);
    this.#keptUpdates?.push({
      vehicleId,
      numExamples,
      deltas: decision.deltas,
    });
    this.#countAccepted(decision.update);
    this.#closeWhenComplete();
  }

  /**
   * Returns the update ids of the entries of the partial counted under
   * `key`, in entry order, or undefined when no such partial was counted.
   */
  countedPartial(key: string): readonly string[] | undefined {
    return this.#countedPartials.get(key);
  }

  /**
   * Counts an accepted depot partial of `bytes`. Its mean delta goes into
   * the FedAvg sum with weight numExamples, so the round's mean is the
   * example-weighted mean over every vehicle. Each entry counts as that
   * vehicle's accepted update, and the round closes as after `record`.
   *
   * @throws {Error} when the partial was counted already, or when the
   *   round keeps updates, clips them or is asynchronous: those rounds
   *   need each vehicle's own update, which a partial does not carry.
   */
  recordPartial(bytes: number, partial: CountedPartial): void {
    if (
      this.#keptUpdates !== undefined ||
      this.#clippedSum !== undefined ||
      this.#asyncBuffer !== undefined
    ) {
      throw new Error(
        `round ${this.round} keeps, clips or buffers single updates, so ` +
          'it cannot count a depot partial',
      );
    }
    if (this.#countedPartials.has(partial.key)) {
      throw new Error(`partial ${partial.key} was already counted`);
    }

    this.accumulator.queue(partial.meanDeltas, partial.numExamples);
    this.#uplinkBytes += bytes;
    this.#examples += partial.numExamples;
    this.#countedPartials.set(
      partial.key,
      partial.entries.map((entry) => entry.updateId),
    );
    for (const entry of partial.entries) {
      this.#countAccepted({ ...entry, round: this.round });
    }
    this.#closeWhenComplete();
  }

  /**
   * Counts a rejected depot partial of `bytes` as one rejected message,
   * unless this round rejected the partial under `key` with the same code
   * already. A depot resends a partial until it gets an ack, so a resend
   * adds only its bytes.
   */
  recordRejectedPartial(
    bytes: number,
    key: string,
    decision: RejectedUpdate,
  ): void {
    if (this.#rejectedPartials.get(key) === decision.code) {
      this.#uplinkBytes += bytes;
      return;
    }
    const hasRoom = this.#rejectedPartials.size < MAX_REJECTED_PARTIALS;
    if (hasRoom || this.#rejectedPartials.has(key)) {
      this.#rejectedPartials.set(key, decision.code);
    }
    this.record(bytes, decision);
  }

  #countAccepted(update: {
    vehicleId: string;
    updateId: string;
    round: number;
  }): void {
    this.#accepted += 1;
    this.#acceptedVehicles.add(update.vehicleId);
    this.#acceptedKeys.add(
      acceptedKeyOf(update, { maxStaleness: this.#asyncBuffer?.maxStaleness }),
    );
    this.#seenUpdateIds.add(update.updateId);
  }

  #closeWhenComplete(): void {
    if (this.#asyncBuffer !== undefined) {
      if (this.#accepted >= this.#asyncBuffer.bufferSize) {
        this.close('buffer-full');
      }
      return;
    }
    // NOTE: a selected vehicle that goes offline is still awaited, so a
    // round with such a vehicle runs until its deadline.
    if (this.#acceptedVehicles.size >= this.selected.size) {
      this.close('all-responded');
    }
  }

  /**
   * The integer FedAvg weight of an accepted update: numExamples, or in
   * asynchronous rounds numExamples * (1 + lag)^-exponent scaled by
   * STALENESS_WEIGHT_SCALE and rounded.
   */
  #weightOf(update: { numExamples: number; baseModelVersion: number }): number {
    const settings = this.#asyncBuffer;
    if (settings === undefined) return update.numExamples;
    const lag = this.baseModelVersion - update.baseModelVersion;
    const weight = stalenessWeight(lag, settings.stalenessExponent);
    return Math.max(
      1,
      Math.round(update.numExamples * weight * STALENESS_WEIGHT_SCALE),
    );
  }

  /**
   * FedAvg's mean delta of the accepted updates. In asynchronous rounds
   * the staleness-weighted sum is divided by the unweighted examples, so
   * stale updates shrink the step instead of only losing share.
   */
  fedAvgMean(): WeightMap {
    if (this.#asyncBuffer === undefined) return this.accumulator.result();
    return this.accumulator.result(this.#examples * STALENESS_WEIGHT_SCALE);
  }

  /**
   * Records the unmasked result of a secure round: its survivors count as
   * the accepted vehicles and `mean` is the round's mean delta.
   */
  recordSecureAggregate(outcome: {
    mean: WeightMap;
    vehicleIds: readonly string[];
    numExamples: number;
    uplinkBytes: number;
  }): void {
    this.#secureMean = outcome.mean;
    this.#secureExamples = outcome.numExamples;
    this.#uplinkBytes += outcome.uplinkBytes;
    this.#accepted += outcome.vehicleIds.length;
    for (const id of outcome.vehicleIds) this.#acceptedVehicles.add(id);
  }

  /** Mean delta of a secure round, once recorded. */
  get secureMean(): WeightMap | undefined {
    return this.#secureMean;
  }

  /** Stops taking updates; later calls do nothing. */
  close(trigger: CloseTrigger): void {
    if (!this.#isOpen) return;
    this.#isOpen = false;
    clearTimeout(this.#deadlineTimer);
    this.#resolveClosed(trigger);
  }

  stats(nowMs = Date.now()): RoundStats {
    return {
      round: this.round,
      baseModelVersion: this.baseModelVersion,
      selected: [...this.selected],
      accepted: this.#accepted,
      rejected: this.#rejected,
      rejectedByReason: { ...this.#rejectedByReason },
      uplinkBytes: this.#uplinkBytes,
      numExamples: this.#secureExamples ?? this.#examples,
      numVehicles: this.#acceptedVehicles.size,
      partials: this.#countedPartials.size,
      durationMs: nowMs - this.openedAtMs,
    };
  }
}
