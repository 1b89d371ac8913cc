/**
 * Option `depots` of hierarchical aggregation, which lists the depot
 * aggregators whose partials the fleet aggregator counts (see
 * depot-partials.ts).
 */
import { ErrorCode, FleetError, assertTopicLevel } from '../protocol/index.ts';

/** Other aggregator options that decide whether partials can be counted. */
export interface DepotCompatibility {
  aggregation: string;
  differentialPrivacy?: unknown;
  secureAggregation?: unknown;
  normBound?: unknown;
  asyncBuffer?: unknown;
  vehicleKeysPath?: string;
}

/**
 * Checks the depot ids and returns a copy. An empty list, the default,
 * turns hierarchical aggregation off.
 *
 * A partial carries one mean delta for many vehicles, so depots exclude
 * every option that needs each vehicle's own update. These are a rule
 * other than fedavg, differential privacy (clips each update), secure
 * aggregation (sums masked single updates), a norm bound, and the
 * asynchronous buffer (weights each update by its staleness). Vehicle
 * keys are excluded too, because the fleet aggregator cannot check a
 * vehicle's signature on a merged update.
 *
 * @throws {FleetError} INVALID_CONFIG for an id that is not one MQTT
 *   topic level, a repeated id, or one of the options above.
 */
export function resolveDepots(
  depots: readonly string[] | undefined,
  context: DepotCompatibility,
): string[] {
  if (depots === undefined || depots.length === 0) return [];
  for (const depotId of depots) {
    try {
      assertTopicLevel('depot id', depotId);
    } catch (err) {
      throw new FleetError(
        ErrorCode.InvalidConfig,
        `aggregator option depots: ${(err as Error).message}`,
        { cause: err },
      );
    }
  }
  const repeated = depots.find((id, index) => depots.indexOf(id) !== index);
  if (repeated !== undefined) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `aggregator option depots names depot ${repeated} twice; expected ` +
        'each depot id once',
    );
  }

  const conflicts = conflictsOf(context);
  if (conflicts.length > 0) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `aggregator option depots cannot be combined with ` +
        `${conflicts.join(', ')}: a depot's partial carries one mean ` +
        "delta for many vehicles, and these need each vehicle's own update",
    );
  }
  return [...depots];
}

function conflictsOf(context: DepotCompatibility): string[] {
  const conflicts: string[] = [];
  if (context.aggregation !== 'fedavg') {
    conflicts.push(`aggregation ${context.aggregation}`);
  }
  if (context.differentialPrivacy !== undefined) {
    conflicts.push('differentialPrivacy');
  }
  if (context.secureAggregation !== undefined) {
    conflicts.push('secureAggregation');
  }
  if (context.normBound !== undefined) conflicts.push('normBound');
  if (context.asyncBuffer !== undefined) conflicts.push('asyncBuffer');
  if (context.vehicleKeysPath !== undefined) {
    conflicts.push('vehicleKeysPath');
  }
  return conflicts;
}
