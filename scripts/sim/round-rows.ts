/**
 * Per-round rows of the simulation report, built from the events of the
 * aggregator instances and the vehicle agents.
 */
import type {
  Aggregator,
  RoundClosedEvent,
  RoundFailedEvent,
} from '../../aggregator/index.ts';
import type { Logger } from '../../protocol/index.ts';
import type { VehicleAgent } from '../../vehicle-agent/index.ts';
import type { RoundProgress } from './progress.ts';
import type { RoundRow } from './report.ts';

/** Decisions of one round, counted from 'update-decided' events. */
interface DecisionTally {
  accepted: number;
  rejected: number;
  rejectedByReason: Record<string, number>;
  bytes: number;
}

function increment(map: Map<number, number>, round: number): void {
  map.set(round, (map.get(round) ?? 0) + 1);
}

/** Collects the rows; `rows()` returns them with the final counts. */
export class RoundRecorder {
  readonly #rows: RoundRow[] = [];
  readonly #progress: RoundProgress;
  readonly #bytesReceived: () => number;
  readonly #log: Logger;
  // Per round: update messages the vehicles sent and resent, and the
  // ones the aggregator received and decided on.
  readonly #sentByRound = new Map<number, number>();
  readonly #resentByRound = new Map<number, number>();
  readonly #deliveredByRound = new Map<number, number>();
  readonly #tallies = new Map<number, DecisionTally>();
  readonly #openedAtMs = new Map<number, number>();
  readonly #selectedCount = new Map<number, number>();
  /** Round of every release an aggregator published. */
  readonly #releaseRounds: number[] = [];
  #downlinkSeen = 0;

  /**
   * @param bytesReceived total round task and release bytes the vehicles
   *   received so far.
   */
  constructor(init: {
    progress: RoundProgress;
    bytesReceived: () => number;
    log: Logger;
  }) {
    this.#progress = init.progress;
    this.#bytesReceived = init.bytesReceived;
    this.#log = init.log;
  }

  attachAggregator(aggregator: Aggregator): void {
    aggregator.on('round-opened', (event) => {
      this.#openedAtMs.set(event.round, Date.now());
      this.#selectedCount.set(event.round, event.selected.length);
      this.#progress.roundOpened(event.round);
    });
    aggregator.on('update-decided', (event) => {
      if (event.round === undefined) return;
      increment(this.#deliveredByRound, event.round);
      this.#tally(event.round, event.accepted, event.reasonCode, event.bytes);
    });
    aggregator.on('release-published', (event) =>
      this.#releaseRounds.push(event.round),
    );
    aggregator.on('round-closed', (event: RoundClosedEvent) => {
      this.#rows.push(
        rowOf(
          event,
          event.accuracy,
          this.#downlinkSinceLastRow(),
          event.modelVersion,
        ),
      );
      this.#progress.roundDone(event.round, event.accuracy);
    });
    aggregator.on('round-failed', (event: RoundFailedEvent) => {
      this.#rows.push({
        ...rowOf(
          event,
          undefined,
          this.#downlinkSinceLastRow(),
          event.modelVersion,
        ),
        failure: event.reasonCode,
      });
      this.#progress.roundDone(event.round, undefined);
      this.#log.warn(
        { round: event.round, code: event.reasonCode },
        'round failed',
      );
    });
  }

  attachAgent(agent: VehicleAgent): void {
    agent.on('update-sent', (event) => {
      increment(this.#sentByRound, event.round);
      this.#progress.updateSent();
    });
    agent.on('update-resent', (event) =>
      increment(this.#resentByRound, event.round),
    );
    // A secure round's masked input takes the place of the update.
    agent.on('secure-input-ready', (event) => {
      increment(this.#sentByRound, event.round);
      this.#progress.updateSent();
    });
  }

  /**
   * Adds the row of `round`, which an aggregator restart abandoned while
   * the model was at `modelVersion`.
   */
  noteInterruptedRound(round: number, modelVersion: number): void {
    const tally = this.#tallies.get(round) ?? emptyTally();
    const openedAtMs = this.#openedAtMs.get(round) ?? Date.now();
    this.#rows.push({
      round,
      modelVersion,
      selected: this.#selectedCount.get(round) ?? 0,
      accepted: tally.accepted,
      rejected: tally.rejected,
      rejectedByReason: { ...tally.rejectedByReason },
      duplicatesDropped: tally.rejectedByReason.DUPLICATE_UPDATE ?? 0,
      sent: 0,
      resent: 0,
      delivered: 0,
      accuracy: null,
      uplinkBytes: tally.bytes,
      downlinkBytes: this.#downlinkSinceLastRow(),
      numExamples: 0,
      durationMs: Date.now() - openedAtMs,
      epsilon: null,
      interrupted: true,
    });
  }

  /** Releases published for models made in `round`. */
  releasesOfRound(round: number): number {
    return this.#releaseRounds.filter((r) => r === round).length;
  }

  /**
   * Returns the rows in order, with sent, resent and delivered counts as
   * of now, so that messages after a round closed count too, and with
   * the injected faults when `faultsByRound` is given.
   */
  rows(
    faultsByRound?: ReadonlyMap<number, Record<string, number>>,
  ): RoundRow[] {
    return this.#rows.map((row) => {
      const counted: RoundRow = {
        ...row,
        ...(row.interrupted === true
          ? { releasesPublished: this.releasesOfRound(row.round) }
          : {}),
        sent: this.#sentByRound.get(row.round) ?? 0,
        resent: this.#resentByRound.get(row.round) ?? 0,
        delivered: this.#deliveredByRound.get(row.round) ?? 0,
      };
      if (faultsByRound !== undefined) {
        counted.faultsInjected = { ...(faultsByRound.get(row.round) ?? {}) };
      }
      return counted;
    });
  }

  #tally(
    round: number,
    accepted: boolean,
    reasonCode: string | undefined,
    bytes: number,
  ): void {
    const tally = this.#tallies.get(round) ?? emptyTally();
    this.#tallies.set(round, tally);
    tally.bytes += bytes;
    if (accepted) {
      tally.accepted += 1;
      return;
    }
    const code = reasonCode ?? 'UNSPECIFIED';
    tally.rejected += 1;
    tally.rejectedByReason[code] = (tally.rejectedByReason[code] ?? 0) + 1;
  }

  #downlinkSinceLastRow(): number {
    const total = this.#bytesReceived();
    const delta = total - this.#downlinkSeen;
    this.#downlinkSeen = total;
    return delta;
  }
}

function emptyTally(): DecisionTally {
  return { accepted: 0, rejected: 0, rejectedByReason: {}, bytes: 0 };
}

function rowOf(
  event: RoundClosedEvent | RoundFailedEvent,
  accuracy: number | undefined,
  downlinkBytes: number,
  modelVersion: number,
): RoundRow {
  return {
    round: event.round,
    modelVersion,
    selected: event.selected.length,
    accepted: event.accepted,
    rejected: event.rejected,
    rejectedByReason: event.rejectedByReason,
    duplicatesDropped: event.rejectedByReason.DUPLICATE_UPDATE ?? 0,
    sent: 0,
    resent: 0,
    delivered: 0,
    accuracy: accuracy ?? null,
    uplinkBytes: event.uplinkBytes,
    downlinkBytes,
    numExamples: event.numExamples,
    durationMs: event.durationMs,
    epsilon: 'epsilon' in event ? (event.epsilon ?? null) : null,
    ...('privacy' in event && event.privacy !== undefined
      ? { medianUpdateNorm: event.privacy.medianUpdateNorm }
      : {}),
  };
}
