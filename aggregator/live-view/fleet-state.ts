/**
 * The live view's picture of the fleet, built from the aggregator's events
 * and accessors, and the JSON shape `/api/fleet` serves. Fields without a
 * value are null, so that every key is present in the JSON.
 */
import {
  VehicleState,
  type Logger,
  type VehicleStatus,
} from '../../protocol/index.ts';
import type {
  AggregatorEvents,
  ReleasePublishedEvent,
  RoundClosedEvent,
  RoundFailedEvent,
  RoundOpenedEvent,
  SecurePhaseEvent,
  UpdateDecidedEvent,
} from '../events.ts';
import { readRolloutView, type RolloutView } from './rollout-view.ts';
import type { LiveViewSource } from './source.ts';

/** Rounds kept for the chart and table. Older ones are dropped. */
export const MAX_ROUNDS_KEPT = 1000;
/** Update messages listed under `updates.recent`, newest first. */
export const MAX_RECENT_UPDATES = 20;
/** Vehicles listed. The rest count in `vehiclesTotal` only. */
export const MAX_VEHICLES_LISTED = 1000;
/** Offline vehicles remembered, so the page can show them as offline. */
const MAX_OFFLINE_REMEMBERED = 1000;

/** One vehicle as `/api/fleet` lists it. */
export interface VehicleView {
  vehicleId: string;
  state: 'online' | 'training' | 'offline';
  /** Model version of the vehicle's latest status. */
  modelVersion: number;
  backend: string;
  numExamples: number;
  /** Epoch ms of the latest status, as the vehicle stamped it. */
  updatedAtMs: number;
}

/** Progress of the open round, or the state of the last one. */
export interface CurrentRoundView {
  round: number;
  state: 'waiting' | 'open' | 'closed' | 'failed';
  baseModelVersion: number | null;
  selected: number;
  accepted: number;
  rejected: number;
  /** Accepted updates the round needs. */
  quorum: number;
  openedAtMs: number | null;
  deadlineMs: number | null;
  /** Phase of a secure round, else null. */
  securePhase: SecurePhaseEvent['phase'] | null;
}

/** One finished round, a point of the chart. */
export interface RoundView {
  round: number;
  outcome: 'closed' | 'failed';
  /** Version the round produced, or the version kept when it failed. */
  modelVersion: number;
  baseModelVersion: number;
  /** Test accuracy of the new version, or null without a test set. */
  accuracy: number | null;
  /** Mean training loss of the accepted updates, weighted by numExamples. */
  trainLoss: number | null;
  selected: number;
  accepted: number;
  rejected: number;
  rejectedByReason: Record<string, number>;
  uplinkBytes: number;
  /** uplinkBytes per update message received in the round. */
  meanUpdateBytes: number | null;
  numExamples: number;
  durationMs: number;
  epsilon: number | null;
  /** ErrorCode of a failed round, else null. */
  reasonCode: string | null;
}

/** One update message and the aggregator's decision on it. */
export interface UpdateView {
  vehicleId: string;
  round: number | null;
  accepted: boolean;
  reasonCode: string | null;
  bytes: number;
  receivedAtMs: number;
}

/** The body of `/api/fleet`. */
export interface FleetSnapshot {
  fleetId: string;
  generatedAtMs: number;
  modelVersion: number;
  maxRounds: number;
  round: CurrentRoundView;
  vehiclesOnline: number;
  vehiclesTotal: number;
  vehicles: VehicleView[];
  /** Online vehicles per model version, newest version first. */
  versions: Array<{ modelVersion: number; vehicles: number }>;
  rounds: RoundView[];
  updates: {
    received: number;
    accepted: number;
    rejected: number;
    totalBytes: number;
    maxBytes: number;
    recent: UpdateView[];
  };
  lastRelease: (ReleasePublishedEvent & { publishedAtMs: number }) | null;
  /**
   * The last staged rollout with its stages and gate values, from the
   * controller's state file, or null when there is none.
   */
  rollout: RolloutView | null;
}

type Listeners = {
  [Name in keyof AggregatorEvents]: (...args: AggregatorEvents[Name]) => void;
};

/**
 * Collects rounds, updates and releases from the aggregator's events, and
 * combines them with the accessors' current values on each `snapshot()`.
 */
export class FleetState {
  readonly #source: LiveViewSource;
  readonly #log: Logger | undefined;
  /** Message of the last rollout file error logged, to log each once. */
  #lastRolloutError: string | undefined;
  readonly #listeners: Listeners;
  #round: CurrentRoundView;
  readonly #rounds: RoundView[] = [];
  readonly #recentUpdates: UpdateView[] = [];
  readonly #updateTotals = { received: 0, accepted: 0, rejected: 0 };
  #totalBytes = 0;
  #maxBytes = 0;
  /** Sum of loss x numExamples and of numExamples, per round. */
  readonly #lossSums = new Map<
    number,
    { weighted: number; examples: number }
  >();
  readonly #offline = new Map<string, VehicleView>();
  #lastOnline = new Map<string, VehicleView>();
  #lastRelease: FleetSnapshot['lastRelease'] = null;

  constructor(source: LiveViewSource, log?: Logger) {
    this.#source = source;
    this.#log = log;
    this.#round = {
      round: source.currentRound(),
      state: 'waiting',
      baseModelVersion: null,
      selected: 0,
      accepted: 0,
      rejected: 0,
      quorum: source.quorum,
      openedAtMs: null,
      deadlineMs: null,
      securePhase: null,
    };
    this.#listeners = {
      'round-opened': (event) => this.#onRoundOpened(event),
      'round-closed': (event) => this.#onRoundEnded(event, undefined),
      'round-failed': (event) => this.#onRoundEnded(undefined, event),
      'update-decided': (event) => this.#onUpdateDecided(event),
      'release-published': (event) => {
        this.#lastRelease = { ...event, publishedAtMs: Date.now() };
      },
      'secure-phase': (event) => {
        if (event.round === this.#round.round) {
          this.#round.securePhase = event.phase;
        }
      },
    };
    // The cast is needed because TypeScript cannot pair each key with its
    // listener type in a loop; the mapped type Listeners pairs them.
    for (const name of Object.keys(this.#listeners) as Array<keyof Listeners>) {
      source.events.on(name, this.#listeners[name] as never);
    }
  }

  /** Stops listening to the aggregator's events. */
  detach(): void {
    for (const name of Object.keys(this.#listeners) as Array<keyof Listeners>) {
      this.#source.events.off(name, this.#listeners[name] as never);
    }
  }

  /** Returns the current picture of the fleet for `/api/fleet`. */
  snapshot(): FleetSnapshot {
    const vehicles = this.#collectVehicles();
    const online = vehicles.filter((vehicle) => vehicle.state !== 'offline');
    return {
      fleetId: this.#source.fleetId,
      generatedAtMs: Date.now(),
      modelVersion: this.#source.currentModelVersion(),
      maxRounds: this.#source.maxRounds,
      round: { ...this.#round },
      vehiclesOnline: online.length,
      vehiclesTotal: vehicles.length,
      vehicles: vehicles.slice(0, MAX_VEHICLES_LISTED),
      versions: countVersions(online),
      rounds: this.#rounds.map((row) => ({ ...row })),
      updates: {
        ...this.#updateTotals,
        totalBytes: this.#totalBytes,
        maxBytes: this.#maxBytes,
        recent: this.#recentUpdates.map((update) => ({ ...update })),
      },
      lastRelease: this.#lastRelease,
      rollout:
        this.#source.rolloutStatePath === undefined
          ? null
          : readRolloutView(this.#source.rolloutStatePath, (err) =>
              this.#onRolloutError(err),
            ),
    };
  }

  /** Logs an unreadable rollout file once per distinct error. */
  #onRolloutError(err: unknown): void {
    const message = err instanceof Error ? err.message : String(err);
    if (message === this.#lastRolloutError) return;
    this.#lastRolloutError = message;
    this.#log?.warn(
      { path: this.#source.rolloutStatePath, reason: message },
      'rollout state not readable, live view shows no rollout',
    );
  }

  /** The last round that produced a version, if any is kept. */
  lastClosedRound(): RoundView | undefined {
    for (let i = this.#rounds.length - 1; i >= 0; i--) {
      if (this.#rounds[i].outcome === 'closed') return this.#rounds[i];
    }
    return undefined;
  }

  /**
   * Lists the online vehicles from the aggregator's registry, then the
   * vehicles seen online before that are now offline, each group by id.
   */
  #collectVehicles(): VehicleView[] {
    const online = new Map<string, VehicleView>();
    for (const status of this.#source.onlineVehicles()) {
      online.set(status.vehicleId, viewOf(status));
      this.#offline.delete(status.vehicleId);
    }
    for (const [vehicleId, view] of this.#lastOnline) {
      if (online.has(vehicleId)) continue;
      this.#offline.set(vehicleId, { ...view, state: 'offline' });
      if (this.#offline.size > MAX_OFFLINE_REMEMBERED) {
        const oldest = this.#offline.keys().next().value as string;
        this.#offline.delete(oldest);
      }
    }
    this.#lastOnline = online;
    // Vehicle ids are unique, so no two entries compare equal.
    const byId = (a: VehicleView, b: VehicleView): number =>
      a.vehicleId < b.vehicleId ? -1 : 1;
    return [
      ...[...online.values()].sort(byId),
      ...[...this.#offline.values()].sort(byId),
    ];
  }

  #onRoundOpened(event: RoundOpenedEvent): void {
    this.#round = {
      round: event.round,
      state: 'open',
      baseModelVersion: event.modelVersion,
      selected: event.selected.length,
      accepted: 0,
      rejected: 0,
      quorum: this.#source.quorum,
      openedAtMs: Date.now(),
      deadlineMs: event.deadlineMs,
      securePhase: null,
    };
  }

  #onUpdateDecided(event: UpdateDecidedEvent): void {
    this.#updateTotals.received += 1;
    this.#updateTotals[event.accepted ? 'accepted' : 'rejected'] += 1;
    this.#totalBytes += event.bytes;
    this.#maxBytes = Math.max(this.#maxBytes, event.bytes);
    this.#recentUpdates.unshift({
      vehicleId: event.vehicleId,
      round: event.round ?? null,
      accepted: event.accepted,
      reasonCode: event.reasonCode ?? null,
      bytes: event.bytes,
      receivedAtMs: Date.now(),
    });
    this.#recentUpdates.length = Math.min(
      this.#recentUpdates.length,
      MAX_RECENT_UPDATES,
    );

    // Counted as the aggregator counts a round: every message received
    // while it is open, whatever round the message names.
    if (this.#round.state === 'open') {
      this.#round[event.accepted ? 'accepted' : 'rejected'] += 1;
    }
    if (event.accepted && event.round !== undefined) {
      this.#addLoss(event.round, event.trainLoss, event.numExamples);
    }
  }

  /** Adds one accepted update's loss to its round's weighted mean. */
  #addLoss(
    round: number,
    trainLoss: number | undefined,
    numExamples: number | undefined,
  ): void {
    if (trainLoss === undefined || !Number.isFinite(trainLoss)) return;
    if (numExamples === undefined || !(numExamples > 0)) return;
    const sums = this.#lossSums.get(round) ?? { weighted: 0, examples: 0 };
    sums.weighted += trainLoss * numExamples;
    sums.examples += numExamples;
    this.#lossSums.set(round, sums);
  }

  #onRoundEnded(
    closed: RoundClosedEvent | undefined,
    failed: RoundFailedEvent | undefined,
  ): void {
    const event = (closed ?? failed)!;
    const sums = this.#lossSums.get(event.round);
    // Entries of rounds that ended without an event (an aggregator stop)
    // go too, so that the map stays small.
    for (const round of this.#lossSums.keys()) {
      if (round <= event.round) this.#lossSums.delete(round);
    }
    const messages = event.accepted + event.rejected;
    this.#rounds.push({
      round: event.round,
      outcome: closed === undefined ? 'failed' : 'closed',
      modelVersion: event.modelVersion,
      baseModelVersion: event.baseModelVersion,
      accuracy: closed?.accuracy ?? null,
      trainLoss: sums === undefined ? null : sums.weighted / sums.examples,
      selected: event.selected.length,
      accepted: event.accepted,
      rejected: event.rejected,
      rejectedByReason: { ...event.rejectedByReason },
      uplinkBytes: event.uplinkBytes,
      meanUpdateBytes: messages === 0 ? null : event.uplinkBytes / messages,
      numExamples: event.numExamples,
      durationMs: event.durationMs,
      epsilon: closed?.epsilon ?? null,
      reasonCode: failed?.reasonCode ?? null,
    });
    if (this.#rounds.length > MAX_ROUNDS_KEPT) this.#rounds.shift();
    if (event.round === this.#round.round) {
      this.#round.state = closed === undefined ? 'failed' : 'closed';
    }
  }
}

function viewOf(status: VehicleStatus): VehicleView {
  return {
    vehicleId: status.vehicleId,
    state: status.state === VehicleState.Training ? 'training' : 'online',
    modelVersion: status.modelVersion,
    backend: status.backend,
    numExamples: status.numExamples,
    updatedAtMs: status.updatedAtMs,
  };
}

function countVersions(online: VehicleView[]): FleetSnapshot['versions'] {
  const counts = new Map<number, number>();
  for (const vehicle of online) {
    counts.set(
      vehicle.modelVersion,
      (counts.get(vehicle.modelVersion) ?? 0) + 1,
    );
  }
  return [...counts]
    .sort(([a], [b]) => b - a)
    .map(([modelVersion, vehicles]) => ({ modelVersion, vehicles }));
}
