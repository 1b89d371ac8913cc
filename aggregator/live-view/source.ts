import type { EventEmitter } from 'node:events';
import type { VehicleStatus } from '../../protocol/index.ts';
import type { AggregatorEvents } from '../events.ts';

/**
 * Events and accessors of a running aggregator, which the live view reads
 * on each request. The aggregator builds one in `start()`, so the view
 * never reaches into its private state.
 */
export interface LiveViewSource {
  /** Emitter of the aggregator's events (the Aggregator itself). */
  events: EventEmitter<AggregatorEvents>;
  fleetId: string;
  /** Accepted updates a round needs (minUpdates). */
  quorum: number;
  /** Rounds the aggregator runs before it stops; 0 runs on. */
  maxRounds: number;
  /** The open round, or the last one opened (0 before the first). */
  currentRound(): number;
  /** Version of the current global model. */
  currentModelVersion(): number;
  /** Latest status of each online vehicle, in any order. */
  onlineVehicles(): VehicleStatus[];
  /** The rollout controller's state file, if rollouts may run. */
  rolloutStatePath?: string;
}
