/**
 * Prometheus metrics of one aggregator, kept in a registry of their own
 * (not prom-client's global one), so that two aggregators in one process
 * do not share counters. Every series carries the label `fleet`.
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { AggregatorEvents } from '../events.ts';
import type { FleetState } from './fleet-state.ts';
import type { LiveViewSource } from './source.ts';

/** Bucket bounds of `fleetlearn_update_bytes`: 1 KiB to 64 MiB, x4. */
const UPDATE_BYTES_BUCKETS = [
  1024, 4096, 16_384, 65_536, 262_144, 1_048_576, 4_194_304, 16_777_216,
  67_108_864,
];
/** Bucket bounds of `fleetlearn_round_duration_seconds`: 0.1 s to 1 h. */
const ROUND_SECONDS_BUCKETS = [
  0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
];

type Listeners = {
  [Name in keyof AggregatorEvents]?: (...args: AggregatorEvents[Name]) => void;
};

/** The metrics of one aggregator, fed by its events. */
export class FleetMetrics {
  readonly registry = new Registry();
  readonly #source: LiveViewSource;
  readonly #state: FleetState;
  readonly #listeners: Listeners;
  #lastAccuracy: Gauge | undefined;
  #lastTrainLoss: Gauge | undefined;

  /** Starts counting `source`'s events. `state` supplies the last round. */
  constructor(source: LiveViewSource, state: FleetState) {
    this.#source = source;
    this.#state = state;
    this.registry.setDefaultLabels({ fleet: source.fleetId });
    const registers = [this.registry];

    const roundsClosed = new Counter({
      name: 'fleetlearn_rounds_closed_total',
      help: 'Rounds that produced a new model version.',
      registers,
    });
    const roundsFailed = new Counter({
      name: 'fleetlearn_rounds_failed_total',
      help: 'Rounds that ended without a new version, by error code.',
      labelNames: ['reason'],
      registers,
    });
    const accepted = new Counter({
      name: 'fleetlearn_updates_accepted_total',
      help: 'Update messages accepted.',
      registers,
    });
    const rejected = new Counter({
      name: 'fleetlearn_updates_rejected_total',
      help: 'Update messages rejected, by error code.',
      labelNames: ['reason'],
      registers,
    });
    const updateBytes = new Histogram({
      name: 'fleetlearn_update_bytes',
      help: 'Size of each update message received, accepted or not.',
      buckets: UPDATE_BYTES_BUCKETS,
      registers,
    });
    const roundSeconds = new Histogram({
      name: 'fleetlearn_round_duration_seconds',
      help: 'Time from round open to close or failure.',
      labelNames: ['outcome'],
      buckets: ROUND_SECONDS_BUCKETS,
      registers,
    });
    const releases = new Counter({
      name: 'fleetlearn_releases_published_total',
      help: 'Model releases published, rollbacks and republications included.',
      registers,
    });
    this.#addStateGauges(registers);

    this.#listeners = {
      'round-closed': (event) => {
        roundsClosed.inc();
        roundSeconds.observe({ outcome: 'closed' }, event.durationMs / 1000);
      },
      'round-failed': (event) => {
        roundsFailed.inc({ reason: event.reasonCode });
        roundSeconds.observe({ outcome: 'failed' }, event.durationMs / 1000);
      },
      'update-decided': (event) => {
        updateBytes.observe(event.bytes);
        if (event.accepted) accepted.inc();
        else rejected.inc({ reason: event.reasonCode ?? 'UNKNOWN' });
      },
      'release-published': () => releases.inc(),
    };
    // The cast is needed because TypeScript cannot pair each key with its
    // listener type in a loop; the mapped type Listeners pairs them.
    for (const name of Object.keys(this.#listeners) as Array<keyof Listeners>) {
      source.events.on(name, this.#listeners[name] as never);
    }
  }

  /** Gauges read from the aggregator at each scrape. */
  #addStateGauges(registers: Registry[]): void {
    const source = this.#source;
    new Gauge({
      name: 'fleetlearn_vehicles_online',
      help: 'Vehicles whose last status is online or training.',
      registers,
      collect() {
        this.set(source.onlineVehicles().length);
      },
    });
    new Gauge({
      name: 'fleetlearn_current_round',
      help: 'The open round, or the last one opened.',
      registers,
      collect() {
        this.set(source.currentRound());
      },
    });
    new Gauge({
      name: 'fleetlearn_model_version',
      help: 'Version of the current global model.',
      registers,
      collect() {
        this.set(source.currentModelVersion());
      },
    });
  }

  /**
   * Sets the gauges of the last closed round from the live view's round
   * history, registering each at its first value. Until then the series
   * is absent, which Prometheus reads as no value. prom-client would
   * write an unset gauge as 0, and NaN as "Nan", which the text format
   * does not define.
   */
  #updateLastRoundGauges(): void {
    const row = this.#state.lastClosedRound();
    const registers = [this.registry];
    if (row !== undefined && row.accuracy !== null) {
      this.#lastAccuracy ??= new Gauge({
        name: 'fleetlearn_last_accuracy',
        help: 'Test accuracy of the version the last closed round produced, 0-1.',
        registers,
      });
      this.#lastAccuracy.set(row.accuracy);
    }
    if (row !== undefined && row.trainLoss !== null) {
      this.#lastTrainLoss ??= new Gauge({
        name: 'fleetlearn_last_train_loss',
        help:
          "Mean training loss of the last closed round's accepted updates, " +
          'weighted by numExamples.',
        registers,
      });
      this.#lastTrainLoss.set(row.trainLoss);
    }
  }

  /** Returns the metrics in the Prometheus text format. */
  render(): Promise<string> {
    this.#updateLastRoundGauges();
    return this.registry.metrics();
  }

  /** The Content-Type of `render()`'s text. */
  get contentType(): string {
    return this.registry.contentType;
  }

  /** Stops counting the aggregator's events. */
  detach(): void {
    for (const name of Object.keys(this.#listeners) as Array<keyof Listeners>) {
      this.#source.events.off(name, this.#listeners[name] as never);
    }
  }
}
