import { connect, type MqttClient } from 'mqtt';
import {
  ErrorCode,
  FleetError,
  clientIdsOf,
  identitiesOfCertificate,
  toMqttSecurityOptions,
  type BrokerClientSecurity,
  type Logger,
} from '../protocol/index.ts';
import { awaitConnect } from '../protocol/mqtt-end.ts';

/** Inputs of {@link connectToBroker}. */
export interface ConnectionOptions {
  brokerUrl: string;
  clientId: string;
  /** Topic filters to subscribe to with QoS 1. */
  subscriptions: string[];
  onMessage: (topic: string, payload: Buffer) => void;
  /** Signal aborted when the owner stops. Later socket errors log at debug. */
  signal: AbortSignal;
  log: Logger;
  /**
   * Client certificate and key (with an `mqtts://` brokerUrl), or
   * username and password; default none.
   */
  security?: BrokerClientSecurity;
}

/**
 * Checks that the client certificate carries the identity of `clientId`,
 * because the broker rejects any other client id.
 */
function assertCertificateMatches(
  security: BrokerClientSecurity | undefined,
  clientId: string,
): void {
  const tls = security?.tls;
  if (tls === undefined) return;
  const clientIds = identitiesOfCertificate(tls.cert).flatMap(clientIdsOf);
  if (clientIds.includes(clientId)) return;
  throw new FleetError(
    ErrorCode.InvalidConfig,
    `certificate ${tls.files.certPath} is for client ids ` +
      `[${clientIds.join(', ')}], expected ${clientId}`,
  );
}

/**
 * Connects with MQTT 3.1.1, retrying every second until the broker
 * accepts, then subscribes. mqtt.js resubscribes after a reconnect.
 *
 * @throws {Error} when `signal` aborts before the connection is up.
 * @throws {FleetError} INVALID_CONFIG when the client certificate is not
 *   for `clientId`.
 */
export async function connectToBroker(
  options: ConnectionOptions,
): Promise<MqttClient> {
  const { brokerUrl, clientId, log, signal } = options;
  assertCertificateMatches(options.security, clientId);
  // A persistent session (clean: false) lets the broker queue QoS 1
  // updates while the aggregator reconnects.
  const client = connect(brokerUrl, {
    ...toMqttSecurityOptions(options.security),
    protocolVersion: 4,
    clientId,
    clean: false,
    reconnectPeriod: 1000,
    // Keep retrying after a refusal, which is logged as an error below.
    reconnectOnConnackError: true,
  });
  client.on('message', options.onMessage);
  // Socket errors such as `write EPIPE` are expected while the client
  // shuts down, so they are logged at debug once `signal` has aborted.
  let refusalLoggedAtMs = -Infinity;
  client.on('error', (err) => {
    const reasonCode = (err as { code?: unknown }).code;
    const isRefusal = typeof reasonCode === 'number';
    if (signal.aborted) {
      log.debug({ err, clientId }, 'mqtt client error');
    } else if (isRefusal && Date.now() - refusalLoggedAtMs < 30_000) {
      log.debug({ err, clientId }, 'mqtt client error');
    } else if (isRefusal) {
      refusalLoggedAtMs = Date.now();
      log.error(
        { clientId, brokerUrl, reasonCode, reason: err.message },
        'broker refused the connection, check credentials',
      );
    } else {
      log.warn({ err, clientId }, 'mqtt client error');
    }
  });
  client.on('offline', () => {
    if (signal.aborted) log.debug({ clientId }, 'mqtt client offline');
    else log.warn({ clientId }, 'mqtt client offline');
  });
  client.on('reconnect', () =>
    log.debug({ clientId }, 'mqtt client reconnecting'),
  );

  await awaitConnect(client, brokerUrl, signal);
  client.on('connect', () => log.info({ clientId }, 'mqtt client reconnected'));

  const filters = Object.fromEntries(
    options.subscriptions.map((filter) => [filter, { qos: 1 as const }]),
  );
  await client.subscribeAsync(filters);
  log.info({ clientId, brokerUrl }, 'connected to broker');
  return client;
}
