/**
 * Sends a sealed partial to the fleet aggregator until it acks it. The
 * fleet acks a partial it already counted ACCEPTED again without counting
 * it twice, so resending the same partial id is safe.
 */
import {
  AckStatus,
  type Logger,
  type UpdateAck,
} from '../../protocol/index.ts';
import { UNKNOWN_UPDATE_ID } from '../messages.ts';

/** Upper bound of the wait between two sends, in milliseconds. */
export const MAX_RESEND_WAIT_MS = 30_000;

/**
 * Returns how long to wait for the ack after send `attempt` (0 for the
 * first send). The first wait is `ackTimeoutMs`. Later ones double up to
 * MAX_RESEND_WAIT_MS and are drawn between half and all of that, so that
 * depots that lost the fleet together do not resend in step.
 */
export function resendWaitMs(
  attempt: number,
  ackTimeoutMs: number,
  random: () => number = Math.random,
): number {
  if (attempt === 0) return ackTimeoutMs;
  const ceiling = Math.min(MAX_RESEND_WAIT_MS, ackTimeoutMs * 2 ** attempt);
  return Math.max(1, Math.round(ceiling * (0.5 + 0.5 * random())));
}

/** Dependencies of PartialForwarder, supplied by the depot. */
export interface ForwarderOptions {
  /** Publishes the partial upstream with QoS 1 and logs its own failures. */
  publish: (bytes: Uint8Array) => void;
  ackTimeoutMs: number;
  log: Logger;
  random?: () => number;
  now?: () => number;
}

/** A partial to send: its id, round and encoded bytes. */
export interface OutgoingPartial {
  partialId: string;
  round: number;
  bytes: Uint8Array;
  /** Deadline of the round in epoch milliseconds. No send starts after it. */
  deadlineMs: number;
}

/** Sends one partial at a time and matches the fleet's acks to it. */
export class PartialForwarder {
  readonly #options: ForwarderOptions;
  /** Send in progress and the callback that hands it its ack. */
  #waiting:
    { partialId: string; resolve: (ack: UpdateAck) => void } | undefined;

  constructor(options: ForwarderOptions) {
    this.#options = options;
  }

  /**
   * Sends `partial` and resends it with backoff until its ack arrives,
   * the deadline passes or `signal` aborts. Resolves with the ack, or
   * undefined without one. One send runs at a time: abort the signal of
   * the previous one before starting another.
   */
  async send(
    partial: OutgoingPartial,
    signal: AbortSignal,
  ): Promise<UpdateAck | undefined> {
    const { log, ackTimeoutMs, publish } = this.#options;
    const now = this.#options.now ?? Date.now;
    const fields = { round: partial.round, partialId: partial.partialId };

    let received: UpdateAck | undefined;
    let wake: () => void = () => undefined;
    this.#waiting = {
      partialId: partial.partialId,
      resolve: (ack) => {
        received = ack;
        wake();
      },
    };

    try {
      for (let attempt = 0; ; attempt++) {
        if (signal.aborted) return undefined;
        const leftMs = partial.deadlineMs - now();
        if (leftMs <= 0) {
          log.error(
            { ...fields, attempts: attempt, deadlineMs: partial.deadlineMs },
            'partial ack timed out at the round deadline, partial dropped',
          );
          return undefined;
        }
        if (attempt > 0) {
          log.warn(
            { ...fields, attempt },
            'partial not acknowledged, resending',
          );
        }
        publish(partial.bytes);
        const waitMs = Math.min(
          leftMs,
          resendWaitMs(attempt, ackTimeoutMs, this.#options.random),
        );
        await new Promise<void>((resolve) => {
          const timer = setTimeout(done, waitMs);
          function done(): void {
            clearTimeout(timer);
            signal.removeEventListener('abort', done);
            resolve();
          }
          wake = done;
          signal.addEventListener('abort', done, { once: true });
          if (received !== undefined || signal.aborted) done();
        });
        if (received !== undefined) return received;
      }
    } finally {
      if (this.#waiting?.partialId === partial.partialId) {
        this.#waiting = undefined;
      }
    }
  }

  /**
   * Hands a fleet ack to the send waiting for it. Returns false when no
   * send waits for this partial id (a late or repeated ack).
   *
   * A rejection with UNKNOWN_UPDATE_ID settles the partial in flight too,
   * with the partial id put in. The fleet sends it for a partial it could
   * not read (too large or not decodable), which a resend would not fix.
   * NOTE: a late copy of such a rejection would settle the next partial
   * instead. The depot stops resending at the first ack, so only a copy
   * delayed past the next round's forward can do that.
   */
  receiveAck(ack: UpdateAck): boolean {
    const waiting = this.#waiting;
    if (waiting === undefined) return false;
    const isUnattributed =
      ack.updateId === UNKNOWN_UPDATE_ID && ack.status === AckStatus.Rejected;
    if (waiting.partialId !== ack.updateId && !isUnattributed) return false;
    this.#waiting = undefined;
    if (isUnattributed) {
      this.#options.log.warn(
        { partialId: waiting.partialId, code: ack.reasonCode },
        'fleet rejected a partial it could not read, taken as this partial',
      );
    }
    waiting.resolve({ ...ack, updateId: waiting.partialId });
    return true;
  }
}
