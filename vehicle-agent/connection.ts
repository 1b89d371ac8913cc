/** MQTT connection of a vehicle: last will, reconnects and their logs. */
import mqtt, { type MqttClient } from 'mqtt';
import {
  toMqttSecurityOptions,
  type BrokerClientSecurity,
  type Logger,
} from '../protocol/index.ts';

/** Options of `createBrokerClient`. */
export interface BrokerConnectionOptions {
  brokerUrl: string;
  clientId: string;
  /** Retained QoS 1 message the broker publishes if the vehicle drops. */
  will: { topic: string; payload: Uint8Array };
  /** Client certificate and key, or username and password; default none. */
  security?: BrokerClientSecurity;
  log: Logger;
  /**
   * Called on every accepted connection. mqtt.js subscribes again by
   * itself after a reconnect.
   */
  onConnect: () => void;
}

/** Delay before the first reconnection attempt, in milliseconds. */
const RECONNECT_BASE_MS = 1000;
/** Upper bound of the delay between attempts, in milliseconds. */
const RECONNECT_MAX_MS = 30_000;

/**
 * Returns the delay before reconnection attempt `attempt + 1`: exponential
 * from RECONNECT_BASE_MS, capped at RECONNECT_MAX_MS, and drawn between
 * half and all of that, so that a fleet that lost the broker together
 * does not come back in step.
 */
export function reconnectDelayMs(
  attempt: number,
  random: () => number = Math.random,
): number {
  const ceiling = Math.min(RECONNECT_MAX_MS, RECONNECT_BASE_MS * 2 ** attempt);
  return Math.round(ceiling * (0.5 + 0.5 * random()));
}
/** Minimum time between two retry warnings, in milliseconds. */
const RECONNECT_LOG_INTERVAL_MS = 30_000;

/**
 * Creates an MQTT 3.1.1 client (aedes rejects MQTT 5) with a persistent
 * session (`clean: false`) under `clientId`, that connects in the
 * background and retries with jittered exponential backoff (about 1 s,
 * doubling up to 30 s) for as long as the broker is unreachable or refuses the
 * connection. The first failed attempt and
 * then at most one attempt per 30 s are logged at warn, with the broker
 * URL, the attempt count and the last error.
 */
export function createBrokerClient(
  options: BrokerConnectionOptions,
): MqttClient {
  const { log, brokerUrl } = options;
  const client = mqtt.connect(brokerUrl, {
    ...toMqttSecurityOptions(options.security),
    protocolVersion: 4,
    clientId: options.clientId,
    // A persistent session: the broker keeps the subscriptions and queues
    // QoS 1 acks while the vehicle is away. The client id must be stable.
    clean: false,
    reconnectPeriod: reconnectDelayMs(0),
    connectTimeout: 10_000,
    // Keep retrying after a refusal: an operator may fix the credentials.
    reconnectOnConnackError: true,
    will: {
      topic: options.will.topic,
      payload: Buffer.from(options.will.payload),
      qos: 1,
      retain: true,
    },
  });

  let attempts = 0;
  let loggedAtMs = -Infinity;
  let lastError: Error | undefined;
  let connectedOnce = false;
  let refusalLoggedAtMs = -Infinity;
  client.on('error', (err) => {
    // mqtt.js emits socket errors such as ECONNREFUSED here and then
    // retries, so the error is reported with the retry below.
    lastError = err;
    log.debug({ err, brokerUrl }, 'mqtt client error');
    const reasonCode = (err as { code?: unknown }).code;
    // A CONNACK refusal (bad credentials, not authorized, revoked) does
    // not fix itself, so it is an error, logged at most every 30 s.
    if (typeof reasonCode !== 'number') return;
    const now = Date.now();
    if (now - refusalLoggedAtMs < RECONNECT_LOG_INTERVAL_MS) return;
    refusalLoggedAtMs = now;
    log.error(
      {
        brokerUrl,
        clientId: options.clientId,
        reasonCode,
        reason: err.message,
      },
      'broker refused the connection, check credentials',
    );
  });
  client.on('reconnect', () => {
    attempts += 1;
    // mqtt.js reads the period when it schedules the next attempt, after
    // this one fails.
    const retryMs = reconnectDelayMs(attempts);
    client.options.reconnectPeriod = retryMs;
    const now = Date.now();
    if (now - loggedAtMs < RECONNECT_LOG_INTERVAL_MS) return;
    loggedAtMs = now;
    log.warn(
      { attempts, brokerUrl, err: lastError, retryMs },
      'broker unreachable, retrying',
    );
  });
  client.on('offline', () => {
    if (connectedOnce) log.warn({ brokerUrl }, 'broker connection lost');
  });
  client.on('connect', () => {
    if (connectedOnce || attempts > 0) {
      log.info({ attempts, brokerUrl }, 'broker connection established');
    }
    connectedOnce = true;
    attempts = 0;
    client.options.reconnectPeriod = reconnectDelayMs(0);
    loggedAtMs = -Infinity;
    lastError = undefined;
    options.onConnect();
  });
  return client;
}
