/** MQTT connection of a vehicle: last will, reconnects and their logs. */
import mqtt, { type MqttClient } from 'mqtt';
import type { Logger } from '../protocol/index.ts';

/** Options of `connectToBroker`. */
export interface BrokerConnectionOptions {
  brokerUrl: string;
  clientId: string;
  /** Retained QoS 1 message the broker publishes if the vehicle drops. */
  will: { topic: string; payload: Uint8Array };
  log: Logger;
  /** Called after every reconnect (not the first connect). */
  onReconnect: () => void;
}

/** Delay between reconnect attempts, in milliseconds. */
const RECONNECT_PERIOD_MS = 2000;
/** Log every this many failed reconnect attempts after the first. */
const RECONNECT_LOG_EVERY = 10;

/**
 * Connects with MQTT 3.1.1, because aedes rejects MQTT 5, and resolves
 * once the broker accepts the connection. While the broker is unreachable
 * the client keeps retrying and the promise waits. It rejects on an error
 * the broker sends back, such as a refused CONNACK.
 */
export function connectToBroker(
  options: BrokerConnectionOptions,
): Promise<MqttClient> {
  const { log } = options;
  const client = mqtt.connect(options.brokerUrl, {
    protocolVersion: 4,
    clientId: options.clientId,
    clean: true,
    reconnectPeriod: RECONNECT_PERIOD_MS,
    connectTimeout: 10_000,
    will: {
      topic: options.will.topic,
      payload: Buffer.from(options.will.payload),
      qos: 1,
      retain: true,
    },
  });

  let attempts = 0;
  let connectedOnce = false;
  client.on('reconnect', () => {
    attempts += 1;
    if (attempts === 1 || attempts % RECONNECT_LOG_EVERY === 0) {
      log.warn(
        { attempts, brokerUrl: options.brokerUrl },
        'broker reconnecting',
      );
    }
  });
  client.on('offline', () => {
    if (connectedOnce) log.warn('broker connection lost');
  });
  client.on('connect', () => {
    attempts = 0;
    if (!connectedOnce) return;
    log.info('broker connection restored');
    options.onReconnect();
  });

  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => {
      client.off('connect', onConnect);
      client.end(true);
      reject(err);
    };
    const onConnect = (): void => {
      connectedOnce = true;
      client.off('error', onError);
      client.on('error', (err) => log.warn({ err }, 'mqtt client error'));
      resolve(client);
    };
    client.once('connect', onConnect);
    client.once('error', onError);
  });
}
