/**
 * Update ids the fleet aggregator has counted. When a vehicle sends one of them
 * again after its round moved on, the depot acks it DUPLICATE_UPDATE, which the
 * agent treats as final, instead of ROUND_CLOSED. A vehicle sends its outbox
 * again after every reconnection, for example after the depot broker restarted,
 * and an ack lost on the way leaves the update in its outbox.
 */
import {
  ErrorCode,
  type RoundTask,
  type UpdateAck,
} from '../../protocol/index.ts';
import { buildAck } from '../messages.ts';
import type { RejectedUpdate } from '../validate.ts';

/** Default number of update ids kept. */
export const DEFAULT_COUNTED_CAPACITY = 10_000;

/**
 * Recent update ids counted by the fleet, with their round. Adding an id
 * beyond `capacity` drops the oldest one.
 * NOTE: kept in memory only, so a restarted depot acks a resend of an
 * update counted before the restart ROUND_CLOSED again.
 */
export class CountedUpdates {
  readonly #capacity: number;
  /** Round of each update id, in the order they were counted. */
  readonly #rounds = new Map<string, number>();

  constructor(capacity = DEFAULT_COUNTED_CAPACITY) {
    this.#capacity = capacity;
  }

  /** Number of update ids kept. */
  get size(): number {
    return this.#rounds.size;
  }

  /** Records that the fleet counted `updateIds` in `round`. */
  add(round: number, updateIds: Iterable<string>): void {
    for (const updateId of updateIds) {
      this.#rounds.delete(updateId);
      this.#rounds.set(updateId, round);
      if (this.#rounds.size > this.#capacity) {
        const oldest = this.#rounds.keys().next().value as string;
        this.#rounds.delete(oldest);
      }
    }
  }

  /** Returns the round in which the fleet counted `updateId`, if it is kept. */
  roundOf(updateId: string): number | undefined {
    return this.#rounds.get(updateId);
  }

  /**
   * Returns the DUPLICATE_UPDATE ack for a rejected update from `vehicleId`
   * that the fleet has counted already, or undefined when the original
   * rejection applies. `current` contains the round and version of the depot's
   * latest task (round 0 and version 0 without one).
   */
  duplicateAck(
    vehicleId: string,
    decision: RejectedUpdate,
    current: Pick<RoundTask, 'round' | 'modelVersion'>,
  ): UpdateAck | undefined {
    const update = decision.update;
    if (update === undefined || update.vehicleId !== vehicleId) {
      return undefined;
    }
    const countedRound = this.roundOf(update.updateId);
    if (countedRound === undefined) return undefined;
    return buildAck(
      {
        accepted: false,
        code: ErrorCode.DuplicateUpdate,
        reason:
          `update ${update.updateId} of vehicle ${vehicleId} was already ` +
          `counted by the fleet aggregator in round ${countedRound}`,
        update,
      },
      { round: current.round, modelVersion: current.modelVersion },
    );
  }
}
