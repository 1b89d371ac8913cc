/**
 * The depot's round logic between the MQTT handlers and DepotRound. A new
 * round task resets the state and reads the journal back. Updates are
 * judged and journaled, and the partial goes out when the round is ready.
 * Every step that touches the round runs in one queue, so steps never
 * interleave.
 */
import type { EventEmitter } from 'node:events';
import {
  decodeRoundTask,
  isFleetError,
  type Logger,
  type RoundTask,
  type UpdateAck,
} from '../../protocol/index.ts';
import { MAX_TIMER_MS } from '../../protocol/mqtt-end.ts';
import { rejectWithoutTask } from './acks.ts';
import { DepotRound, type UpdateCaps } from './collector.ts';
import { CountedUpdates } from './counted-updates.ts';
import type { DepotEvents } from './events.ts';
import type { PartialForwarder } from './forwarder.ts';
import { PartialDelivery } from './delivery.ts';
import { readUnsettled, restoreRound, type DepotJournal } from './journal.ts';
import { logRoundStart } from './round-log.ts';
import { EarlierPartials } from './unsettled.ts';
import { UpdateReplies } from './update-replies.ts';

/** Dependencies of RoundFlow, supplied by the depot. */
export interface RoundFlowOptions {
  depotId: string;
  caps: UpdateCaps;
  forwardMarginMs: number;
  journal: DepotJournal;
  forwarder: PartialForwarder;
  /** Vehicles online on the depot broker. */
  members: () => ReadonlySet<string>;
  /** Publishes an ack on the vehicle's ack topic and logs its own failures. */
  publishAck: (vehicleId: string, ack: UpdateAck) => void;
  /** The depot's `emit`. */
  emit: EventEmitter<DepotEvents>['emit'];
  log: Logger;
}

/** Round state of one depot, driven by the depot's message handlers. */
export class RoundFlow {
  readonly #options: RoundFlowOptions;
  readonly #log: Logger;
  readonly #delivery: PartialDelivery;
  readonly #replies: UpdateReplies;
  readonly #earlier: EarlierPartials;
  #round: DepotRound | undefined;
  /** Controller aborted when the round is replaced or the depot stops. */
  #roundAbort = new AbortController();
  #forwardTimer: NodeJS.Timeout | undefined;
  #queue: Promise<void> = Promise.resolve();
  #isClosed = false;
  /** Flag set once the depot broker's retained statuses had time to arrive. */
  #areMembersKnown = false;

  constructor(options: RoundFlowOptions) {
    this.#options = options;
    this.#log = options.log;
    const { journal, publishAck, emit, log } = options;
    const counted = new CountedUpdates();
    this.#replies = new UpdateReplies({ counted, publishAck, emit, log });
    this.#earlier = new EarlierPartials({
      journal,
      counted,
      publishAck,
      emit,
      log,
    });
    this.#delivery = new PartialDelivery({
      forwarder: options.forwarder,
      journal,
      maxMessageBytes: options.caps.maxMessageBytes,
      publishAck,
      emit,
      isCurrent: (round) => round === this.#round,
      replaceRound: (round, next) => {
        if (round === this.#round) this.#round = next;
      },
      serially: (step) => this.#serially(step),
      counted,
      earlier: this.#earlier,
      log,
    });
  }

  /**
   * Reads the partials that an earlier run sent without receiving their
   * ack. Call it before subscribing to the fleet's acks.
   */
  async loadUnsettled(): Promise<void> {
    this.#earlier.add(await readUnsettled(this.#options.journal, this.#log));
  }

  /** Hands the fleet's ack of a partial to the send waiting for it. */
  onFleetAck(ack: UpdateAck): void {
    this.#delivery.receiveFleetAck(ack);
  }

  /** The round of the latest task, if one arrived. */
  get round(): DepotRound | undefined {
    return this.#round;
  }

  /** Returns a promise that resolves once the queued steps have run. */
  idle(): Promise<void> {
    return this.#queue;
  }

  /** Stops the timers and forwarding, and makes later steps do nothing. */
  close(): void {
    this.#isClosed = true;
    clearTimeout(this.#forwardTimer);
    this.#roundAbort.abort();
  }

  /** Runs `step` after the steps queued before it. */
  #serially(step: () => Promise<void>): Promise<void> {
    const run = this.#queue.then(() => (this.#isClosed ? undefined : step()));
    this.#queue = run.catch((err: unknown) => {
      this.#log.error(
        { err, round: this.#round?.round },
        'depot round step failed',
      );
    });
    return this.#queue;
  }

  /** Takes a round task from the fleet broker. */
  onRoundTask(payload: Uint8Array): Promise<void> {
    return this.#serially(async () => {
      if (payload.byteLength === 0) {
        this.#log.debug('retained round task cleared');
        return;
      }
      let task: RoundTask;
      try {
        task = decodeRoundTask(payload);
      } catch (err) {
        if (!isFleetError(err)) throw err;
        this.#log.warn(
          { code: err.code, reason: err.message },
          'invalid round task from the fleet',
        );
        return;
      }

      const current = this.#round;
      if (current !== undefined && task.round === current.round) return;

      // A lower round number is new only when it opened later, which
      // happens when the fleet aggregator started over on a new state
      // directory.
      const isOlder =
        current !== undefined &&
        task.round < current.round &&
        task.openedAtMs <= current.task.openedAtMs;
      if (isOlder) {
        this.#log.warn(
          { round: task.round, currentRound: current.round },
          'older round task ignored',
        );
        return;
      }

      await this.#startRound(task);
    });
  }

  async #startRound(task: RoundTask): Promise<void> {
    clearTimeout(this.#forwardTimer);
    this.#roundAbort.abort();
    this.#roundAbort = new AbortController();
    const round = new DepotRound(
      this.#options.depotId,
      task,
      this.#options.caps,
    );
    this.#round = round;
    const removed = await this.#options.journal.removeOtherRounds(task.round);
    const restored = await restoreRound(
      round,
      this.#options.journal,
      this.#log,
    );
    logRoundStart(this.#log, round, {
      restored,
      removed,
      forwardMarginMs: this.#options.forwardMarginMs,
    });
    this.#options.emit('round-started', {
      round: task.round,
      modelVersion: task.modelVersion,
      selected: [...task.selectedVehicles],
      restoredUpdates: restored,
    });

    if (round.sealed !== undefined) {
      this.#earlier.forget(round.sealed.partialId);
    }
    if (round.phase === 'forwarded') {
      this.#delivery.send(round, this.#roundAbort.signal);
      return;
    }
    if (round.phase === 'settled') {
      this.#delivery.ackVehicles(round);
      return;
    }

    const forwardAtMs = task.deadlineMs - this.#options.forwardMarginMs;
    const delayMs = Math.min(
      MAX_TIMER_MS,
      Math.max(0, forwardAtMs - Date.now()),
    );
    this.#forwardTimer = setTimeout(() => {
      void this.#serially(() => this.#forwardIfReady(round, true));
    }, delayMs);
    await this.#forwardIfReady(round, false);
  }

  /** Judges an update from the depot broker and acks a rejection. */
  onUpdate(vehicleId: string, payload: Uint8Array): Promise<void> {
    return this.#serially(async () => {
      const round = this.#round;
      if (round === undefined) {
        const { decision, ack } = rejectWithoutTask(
          vehicleId,
          payload,
          this.#options.caps,
        );
        const current = { round: 0, modelVersion: 0 };
        this.#replies.reject(vehicleId, decision, ack, current);
        return;
      }

      const decision = round.judge(vehicleId, payload, Date.now());
      if (decision.accepted === 'resent') {
        this.#replies.resent(round, vehicleId, decision.updateId);
        return;
      }
      if (!decision.accepted) {
        const ack = round.rejectionAck(decision);
        this.#replies.reject(vehicleId, decision, ack, round.current);
        await this.#forwardIfReady(round, false);
        return;
      }

      const { updateId, numExamples } = decision.update;
      try {
        await this.#options.journal.addUpdate(round.round, updateId, payload);
      } catch (err) {
        // NOTE: the update still counts, but a depot crash before the
        // fleet's ack loses it until the vehicle resends it.
        this.#log.error(
          { err, vehicleId, round: round.round, updateId },
          'journaling the accepted update failed, it is merged anyway',
        );
      }
      this.#log.debug(
        { vehicleId, round: round.round, updateId, numExamples },
        'update accepted',
      );
      this.#options.emit('update-decided', {
        vehicleId,
        round: round.round,
        updateId,
        accepted: true,
      });
      await this.#forwardIfReady(round, false);
    });
  }

  /**
   * Lets the partial go once every member has a decision. Until then only
   * the forward time sends it. Right after a restart the depot may not yet
   * have the statuses of its online vehicles, and would otherwise forward
   * the journaled updates alone.
   */
  markMembersKnown(): Promise<void> {
    this.#areMembersKnown = true;
    return this.checkForward();
  }

  /** Forwards the partial of the current round if it is ready. */
  checkForward(): Promise<void> {
    return this.#serially(async () => {
      if (this.#round === undefined) return;
      await this.#forwardIfReady(this.#round, false);
    });
  }

  /**
   * Seals and sends the partial of `round` when every member has a
   * decision, or with `isForwardTime` set. Nothing goes out without an
   * accepted update, and after the forward time the next accepted update
   * forwards at once.
   */
  async #forwardIfReady(
    round: DepotRound,
    isForwardTime: boolean,
  ): Promise<void> {
    if (round !== this.#round || round.phase !== 'collecting') return;
    if (isForwardTime) {
      round.markForwardTimePassed();
      if (round.entries.length === 0) {
        this.#log.info(
          { round: round.round },
          'forward time reached, no update to forward',
        );
      }
    }
    if (!isForwardTime && !this.#areMembersKnown) return;
    if (!round.isReadyToForward(this.#options.members())) return;

    clearTimeout(this.#forwardTimer);
    const sealed = round.seal(Date.now());
    try {
      await this.#options.journal.recordForwarded(round.round, {
        partialId: sealed.partialId,
        updateIds: sealed.partial.updates.map((entry) => entry.updateId),
      });
    } catch (err) {
      this.#log.error(
        { err, round: round.round, partialId: sealed.partialId },
        'journaling the forwarded partial failed, it is sent anyway',
      );
    }
    this.#delivery.send(round, this.#roundAbort.signal);
  }
}
