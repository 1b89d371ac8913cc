import { createServer, type Server } from 'node:net';
import { Aedes, type Client } from 'aedes';
import { createLogger, type Logger } from '../protocol/index.ts';

/** Options of {@link startBroker}. */
export interface BrokerOptions {
  /** TCP port; 0 picks a free port. Default 1883. */
  port?: number;
  /** Interface to listen on. Default 127.0.0.1 (loopback only). */
  host?: string;
  /** Parent logger; the broker logs through a child `{ component: 'broker' }`. */
  log?: Logger;
}

/** A running broker. */
export interface RunningBroker {
  /** The port the broker listens on (the real one when 0 was requested). */
  readonly port: number;
  readonly host: string;
  /** Disconnects every client, then stops listening. Safe to call twice. */
  close(): Promise<void>;
}

/**
 * Starts an aedes MQTT 3.1.1 broker on a TCP server. aedes 1.x rejects
 * MQTT 5 connections, so clients connect with `protocolVersion: 4`.
 *
 * @throws {RangeError} for a port outside 0-65535.
 */
export async function startBroker(
  options: BrokerOptions = {},
): Promise<RunningBroker> {
  const { port = 1883, host = '127.0.0.1' } = options;
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new RangeError(`port must be an integer in 0-65535, got ${port}`);
  }
  const log = (options.log ?? createLogger()).child({ component: 'broker' });

  const aedes = await Aedes.createBroker();
  attachLogging(aedes, log);
  const server = createServer(aedes.handle);
  try {
    await listen(server, port, host);
  } catch (err) {
    await closeAedes(aedes);
    throw err;
  }
  const address = server.address();
  const boundPort =
    typeof address === 'object' && address !== null ? address.port : port;
  log.info({ host, port: boundPort }, 'broker started');

  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closing ??= (async () => {
      await closeAedes(aedes);
      await new Promise<void>((resolve) => server.close(() => resolve()));
      log.info({ host, port: boundPort }, 'broker stopped');
    })();
    return closing;
  };
  return { port: boundPort, host, close };
}

function listen(server: Server, port: number, host: string): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

function closeAedes(aedes: Aedes): Promise<void> {
  return new Promise((resolve) => aedes.close(() => resolve()));
}

function attachLogging(aedes: Aedes, log: Logger): void {
  aedes.on('client', (client: Client) => {
    log.info({ clientId: client.id }, 'client connected');
  });
  aedes.on('clientDisconnect', (client: Client) => {
    log.info({ clientId: client.id }, 'client disconnected');
  });
  aedes.on('clientError', (client: Client, err: Error) => {
    log.warn({ clientId: client.id, err }, 'client error');
  });
  aedes.on('connectionError', (client: Client, err: Error) => {
    log.warn({ clientId: client?.id, err }, 'connection error');
  });
  aedes.on('keepaliveTimeout', (client: Client) => {
    log.warn({ clientId: client.id }, 'client keepalive timed out');
  });
  aedes.on('subscribe', (subscriptions, client: Client) => {
    if (!log.isLevelEnabled('debug')) return;
    const topics = subscriptions.map((subscription) => subscription.topic);
    log.debug({ clientId: client?.id, topics }, 'client subscribed');
  });
}
