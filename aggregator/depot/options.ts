/**
 * Options of a depot aggregator: its ids, the two broker URLs, the update
 * caps it validates with and its timings. Defaults match the fleet
 * aggregator's, so that a depot accepts what the fleet would.
 */
import path from 'node:path';
import {
  DEFAULT_MAX_MESSAGE_BYTES,
  ErrorCode,
  FleetError,
  assertTopicLevel,
  createLogger,
  type Logger,
} from '../../protocol/index.ts';
import {
  optionChecks,
  type OptionChecks,
} from '../../protocol/option-checks.ts';
import { MAX_ABS_WEIGHTED_DELTA, MAX_EXAMPLES_PER_ADD } from '../fedavg.ts';

/** Default of `forwardMarginMs`. */
export const DEFAULT_FORWARD_MARGIN_MS = 2000;

/** Default of `partialAckTimeoutMs`. */
export const DEFAULT_PARTIAL_ACK_TIMEOUT_MS = 1000;

/** URL schemes of plain MQTT over TCP, the only transport the depot uses. */
const PLAIN_SCHEMES = ['mqtt:', 'tcp:'];

/** URL schemes that would need TLS, which the depot does not support yet. */
const TLS_SCHEMES = ['mqtts:', 'ssl:', 'tls:', 'wss:'];

/** Options of a Depot. Only the ids and the two URLs are required. */
export interface DepotOptions {
  /** Depot id, one MQTT topic level. */
  depotId: string;
  /** Fleet id, one MQTT topic level. */
  fleetId: string;
  /** Plain MQTT URL of the fleet broker, for example mqtt://10.0.0.1:1883. */
  upstreamUrl: string;
  /** Plain MQTT URL of the depot's own broker, where its vehicles connect. */
  downstreamUrl: string;
  /**
   * Directory of the update journal, created when missing. Default
   * `state/depot-<depotId>`.
   */
  stateDir?: string;
  /** Maximum numExamples of one update. Default 1,000,000. */
  maxExamplesPerUpdate?: number;
  /** Maximum |value| of a delta element. Default 1000. */
  maxAbsDeltaValue?: number;
  /** Maximum size of an update and of the partial. Default 64 MiB. */
  maxMessageBytes?: number;
  /**
   * Time before the round's deadline at which the partial is forwarded at
   * the latest, in milliseconds. Default 2000 ms.
   */
  forwardMarginMs?: number;
  /**
   * First wait for the fleet's ack before the partial is sent again, in
   * milliseconds. Later waits double, with jitter, up to 30 s. Default
   * 1000 ms.
   */
  partialAckTimeoutMs?: number;
  /** Parent logger. The depot logs through a child of it. */
  log?: Logger;
}

/** Depot options with defaults filled in and checked. */
export type ResolvedDepotOptions = Required<Omit<DepotOptions, 'log'>> & {
  log: Logger;
};

const { invalid, requireDuration, requireInteger }: OptionChecks =
  optionChecks('depot option');

/** Rejects a value that is not one valid MQTT topic level. */
function requireTopicLevel(option: string, kind: string, value: unknown): void {
  if (typeof value !== 'string') {
    throw new TypeError(
      `depot option ${option} must be a string, got ${JSON.stringify(value)}`,
    );
  }
  try {
    assertTopicLevel(kind, value);
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `depot option ${option}: ${(err as Error).message}`,
      { cause: err },
    );
  }
}

/**
 * Checks that `value` is a plain MQTT URL with a host, and returns it in
 * a canonical form (scheme, host and port) for comparing two URLs.
 *
 * @throws {FleetError} INVALID_CONFIG for a malformed URL, a TLS scheme or
 *   another transport.
 */
export function checkBrokerUrl(option: string, value: unknown): string {
  if (typeof value !== 'string' || value.length === 0) {
    throw new TypeError(
      `depot option ${option} must be a non-empty string, got ` +
        `${JSON.stringify(value)}`,
    );
  }
  let url: URL;
  try {
    url = new URL(value);
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `depot option ${option} is ${value}, which is not a URL. Expected a ` +
        'URL such as mqtt://host:1883',
      { cause: err },
    );
  }
  if (TLS_SCHEMES.includes(url.protocol)) {
    invalid(
      option,
      value,
      'a plain mqtt:// URL, because the depot does not support TLS yet',
    );
  }
  if (!PLAIN_SCHEMES.includes(url.protocol) || url.hostname === '') {
    invalid(option, value, 'mqtt://host:port');
  }
  return `mqtt://${url.hostname}:${url.port === '' ? '1883' : url.port}`;
}

/**
 * Fills in defaults and checks every option.
 *
 * @throws {TypeError} for a missing id or URL.
 * @throws {FleetError} INVALID_CONFIG naming the option for a value that
 *   cannot work, for example the same broker upstream and downstream,
 *   which would relay the round task back to where it came from forever.
 */
export function resolveDepotOptions(
  options: DepotOptions,
): ResolvedDepotOptions {
  requireTopicLevel('depotId', 'depot id', options.depotId);
  requireTopicLevel('fleetId', 'fleet id', options.fleetId);
  const upstream = checkBrokerUrl('upstreamUrl', options.upstreamUrl);
  const downstream = checkBrokerUrl('downstreamUrl', options.downstreamUrl);
  if (upstream === downstream) {
    invalid(
      'downstreamUrl',
      options.downstreamUrl,
      `another broker than upstreamUrl ${options.upstreamUrl}`,
    );
  }

  const resolved: ResolvedDepotOptions = {
    depotId: options.depotId,
    fleetId: options.fleetId,
    upstreamUrl: options.upstreamUrl,
    downstreamUrl: options.downstreamUrl,
    stateDir:
      options.stateDir ?? path.join('state', `depot-${options.depotId}`),
    maxExamplesPerUpdate: options.maxExamplesPerUpdate ?? 1_000_000,
    maxAbsDeltaValue: options.maxAbsDeltaValue ?? 1000,
    maxMessageBytes: options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES,
    forwardMarginMs: options.forwardMarginMs ?? DEFAULT_FORWARD_MARGIN_MS,
    partialAckTimeoutMs:
      options.partialAckTimeoutMs ?? DEFAULT_PARTIAL_ACK_TIMEOUT_MS,
    log: options.log ?? createLogger(),
  };
  checkResolvedValues(resolved);
  return resolved;
}

function checkResolvedValues(options: ResolvedDepotOptions): void {
  if (typeof options.stateDir !== 'string' || options.stateDir === '') {
    invalid('stateDir', JSON.stringify(options.stateDir), 'a directory path');
  }

  requireInteger('maxMessageBytes', options.maxMessageBytes, 1024);
  requireInteger('maxExamplesPerUpdate', options.maxExamplesPerUpdate, 1);
  if (options.maxExamplesPerUpdate > MAX_EXAMPLES_PER_ADD) {
    invalid(
      'maxExamplesPerUpdate',
      options.maxExamplesPerUpdate,
      `an integer <= ${MAX_EXAMPLES_PER_ADD}`,
    );
  }

  const maxAbs = options.maxAbsDeltaValue;
  if (!(maxAbs > 0) || !Number.isFinite(maxAbs)) {
    invalid('maxAbsDeltaValue', maxAbs, 'a positive number');
  }
  // The same bound as the fleet aggregator's: every update that passes
  // validation must fit the exact sums of FedAvgAccumulator.
  if (maxAbs * options.maxExamplesPerUpdate > MAX_ABS_WEIGHTED_DELTA) {
    invalid(
      'maxAbsDeltaValue',
      maxAbs,
      `a number <= ${MAX_ABS_WEIGHTED_DELTA} / maxExamplesPerUpdate ` +
        `(${options.maxExamplesPerUpdate})`,
    );
  }

  requireDuration('forwardMarginMs', options.forwardMarginMs, 0);
  requireDuration('partialAckTimeoutMs', options.partialAckTimeoutMs, 1);
}
