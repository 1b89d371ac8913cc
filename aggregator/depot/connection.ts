/**
 * The depot's two MQTT connections: upstream to the fleet broker and
 * downstream to the depot broker. Both use persistent sessions, so each
 * broker queues QoS 1 messages while the depot is away.
 */
import { connect, type IClientOptions, type MqttClient } from 'mqtt';
import type { Logger } from '../../protocol/index.ts';
import { awaitConnect } from '../../protocol/mqtt-end.ts';

/**
 * Side of a depot connection: upstream to the fleet broker, downstream to
 * the depot broker.
 */
export type DepotSide = 'upstream' | 'downstream';

/** Delay between connection attempts, in milliseconds. */
const RECONNECT_PERIOD_MS = 1000;

/** Minimum time between two connection error warnings of one side. */
const ERROR_LOG_INTERVAL_MS = 30_000;

/** Inputs of {@link connectSide}. */
export interface SideOptions {
  side: DepotSide;
  url: string;
  clientId: string;
  /** Topic filters to subscribe to with QoS 1 on every new session. */
  subscriptions: string[];
  /**
   * Handles one incoming message. The PUBACK of a QoS 1 message goes
   * once it resolves, and the client takes no other message before, so
   * messages are handled one at a time in arrival order. It must not wait
   * for the other connection, because that one may be waiting for this.
   */
  handleMessage: (topic: string, payload: Buffer) => Promise<void>;
  /** Called after a reconnection whose broker had lost the session. */
  onSessionLost: () => void;
  /** Last will the broker publishes when the connection is lost. */
  will?: IClientOptions['will'];
  /** Signal aborted when the depot stops. Later socket errors log at debug. */
  signal: AbortSignal;
  log: Logger;
}

/** Connection being opened: its client and its first connection. */
export interface OpenedSide {
  /**
   * Client, usable at once because mqtt.js queues QoS 1 publishes until
   * connected.
   */
  client: MqttClient;
  /**
   * Promise that resolves once connected and subscribed. It rejects, after
   * ending the client, when `signal` aborts first.
   */
  connected: Promise<void>;
}

/**
 * Opens a connection with MQTT 3.1.1 and a persistent session (`clean: false`)
 * that retries every second until the broker accepts, then subscribes. mqtt.js
 * does not subscribe again after a reconnection with a persistent session, so
 * this function subscribes again when the broker lost the session. The client
 * exists before the first message arrives, so a message handler can publish on
 * it.
 */
export function openSide(options: SideOptions): OpenedSide {
  const { side, url, clientId, log } = options;
  const client = connect(url, {
    protocolVersion: 4,
    clientId,
    clean: false,
    reconnectPeriod: RECONNECT_PERIOD_MS,
    connectTimeout: 10_000,
    reconnectOnConnackError: true,
    will: options.will,
  });

  client.handleMessage = (packet, done) => {
    const payload = Buffer.isBuffer(packet.payload)
      ? packet.payload
      : Buffer.from(packet.payload);
    options.handleMessage(packet.topic, payload).then(
      () => done(),
      (err: unknown) => {
        log.error(
          { err, side, clientId, topic: packet.topic },
          'message handler failed',
        );
        done();
      },
    );
  };
  logConnectionEvents(client, options);

  const connected = awaitFirstConnection(client, options);
  // Marks a rejection as handled, because the caller awaits it later.
  connected.catch(() => undefined);
  return { client, connected };
}

async function awaitFirstConnection(
  client: MqttClient,
  options: SideOptions,
): Promise<void> {
  const { side, url, clientId, log, signal } = options;
  await awaitConnect(client, url, signal);
  await subscribe(client, options.subscriptions);
  log.info({ side, clientId, brokerUrl: url }, 'connected to broker');

  client.on('connect', (connack) => {
    log.info(
      { side, clientId, sessionPresent: connack.sessionPresent },
      'broker connection restored',
    );
    if (connack.sessionPresent) return;
    log.warn({ side, clientId }, 'broker lost the session, subscribing again');
    subscribe(client, options.subscriptions).then(
      () => options.onSessionLost(),
      (err: unknown) =>
        log.warn({ err, side, clientId }, 'subscription failed'),
    );
  });
}

/**
 * Publishes `payload` on `topic` with QoS 1, not retained, and logs a
 * failure with `fields`.
 */
export function publishQos1(
  client: MqttClient,
  topic: string,
  payload: Uint8Array,
  log: Logger,
  fields: Record<string, unknown> = {},
): void {
  client.publish(topic, Buffer.from(payload), { qos: 1 }, (err) => {
    if (err !== undefined && err !== null) {
      log.warn({ err, ...fields, topic }, 'publish failed');
    }
  });
}

/** Subscribes to `filters` with QoS 1. */
export async function subscribe(
  client: MqttClient,
  filters: readonly string[],
): Promise<void> {
  await client.subscribeAsync(
    Object.fromEntries(filters.map((filter) => [filter, { qos: 1 as const }])),
  );
}

function logConnectionEvents(client: MqttClient, options: SideOptions): void {
  const { side, clientId, url, log, signal } = options;
  let errorLoggedAtMs = -Infinity;
  client.on('error', (err) => {
    const now = Date.now();
    if (signal.aborted || now - errorLoggedAtMs < ERROR_LOG_INTERVAL_MS) {
      log.debug({ err, side, clientId }, 'mqtt client error');
      return;
    }
    errorLoggedAtMs = now;
    log.warn({ err, side, clientId, brokerUrl: url }, 'mqtt client error');
  });

  client.on('offline', () => {
    if (signal.aborted) {
      log.debug({ side }, 'broker connection lost');
      return;
    }
    log.warn({ side, brokerUrl: url }, 'broker connection lost');
  });

  client.on('reconnect', () => {
    log.debug({ side, brokerUrl: url }, 'reconnecting to broker');
  });
}
