import type { EventEmitter } from 'node:events';
import type { Server, Socket } from 'node:net';
import { Aedes, type Client } from 'aedes';
import {
  DEFAULT_MAX_MESSAGE_BYTES,
  createLogger,
  type FleetRole,
  type Logger,
} from '../protocol/index.ts';
import { AccessControl } from './access-control.ts';
import { AccessDeniedError } from './identity.ts';
import {
  createListener,
  isLoopbackHost,
  type BrokerTlsOptions,
} from './listener.ts';
import { PasswordDirectory } from './passwords.ts';
import { checkClientLimits, type ClientLimits } from './rate-limit.ts';
import { connectRedis, type RedisBackend } from './redis.ts';

/** Options of {@link startBroker}. */
export interface BrokerOptions {
  /** TCP port; 0 picks a free port. Default 1883. */
  port?: number;
  /** Interface to listen on. Default 127.0.0.1 (loopback only). */
  host?: string;
  /** Parent logger; the broker logs through a child `{ component: 'broker' }`. */
  log?: Logger;
  /** Listen with TLS (mqtts) instead of plain TCP. */
  tls?: BrokerTlsOptions;
  /**
   * Users file of development username and password identities (see
   * `provision add-user`). Read at start and by `reloadCredentials()`.
   */
  usersPath?: string;
  /** Per-client limits by role; unset fields keep their defaults. */
  limits?: Partial<Record<FleetRole, Partial<ClientLimits>>>;
  /**
   * `redis://host:port`: share messages, retained messages, subscriptions
   * and sessions through Redis with the other broker nodes given the same
   * URL (see broker/redis.ts). Unset, the broker keeps them in memory.
   */
  redisUrl?: string;
}

/** A running broker. */
export interface RunningBroker {
  /** The port the broker listens on (the real one when 0 was requested). */
  readonly port: number;
  readonly host: string;
  /** True when the broker listens with TLS. */
  readonly secure: boolean;
  /**
   * Re-reads the TLS files (certificate, key, CA, CRL) and the users file
   * for new connections, then closes the connections whose certificate
   * the new CRL revokes or whose user is no longer listed.
   *
   * @throws {FleetError} INVALID_CONFIG for an unreadable or invalid file;
   *   the previous files stay in force.
   */
  reloadCredentials(): { closedClients: number };
  /** Disconnects every client, then stops listening. Safe to call twice. */
  close(): Promise<void>;
}

/**
 * Default limits. A vehicle publishes a status on each state change and
 * one update per round, and resends its outbox after a reconnect, so a
 * burst of 100 leaves room. The aggregator sends an ack to every vehicle
 * of a round in a burst, plus the release chunks.
 * NOTE: these are estimates, not measured fleet rates.
 */
export const DEFAULT_CLIENT_LIMITS: Readonly<Record<FleetRole, ClientLimits>> =
  {
    vehicle: {
      maxMessageBytes: DEFAULT_MAX_MESSAGE_BYTES,
      publishesPerSecond: 10,
      publishBurst: 100,
    },
    aggregator: {
      maxMessageBytes: DEFAULT_MAX_MESSAGE_BYTES,
      publishesPerSecond: 1000,
      publishBurst: 10_000,
    },
  };

function resolveLimits(
  limits: BrokerOptions['limits'],
): Record<FleetRole, ClientLimits> {
  const resolved = {
    vehicle: { ...DEFAULT_CLIENT_LIMITS.vehicle, ...limits?.vehicle },
    aggregator: { ...DEFAULT_CLIENT_LIMITS.aggregator, ...limits?.aggregator },
  };
  checkClientLimits('vehicle', resolved.vehicle);
  checkClientLimits('aggregator', resolved.aggregator);
  return resolved;
}

/**
 * Starts an aedes MQTT 3.1.1 broker on TCP or TLS. aedes 1.x rejects
 * MQTT 5 connections, so clients connect with `protocolVersion: 4`.
 *
 * With a client CA (`tls.caPath`) or a users file, every client must prove
 * a fleet identity, use the client id of that identity, and stay within
 * its role's topics and limits (see broker/acl.ts). Without either, any
 * client may do anything, which is meant for loopback development only.
 *
 * @throws {RangeError} for a port outside 0-65535 or invalid limits.
 * @throws {FleetError} INVALID_CONFIG for an unreadable or invalid TLS or
 *   users file.
 */
export async function startBroker(
  options: BrokerOptions = {},
): Promise<RunningBroker> {
  const { port = 1883, host = '127.0.0.1' } = options;
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new RangeError(`port must be an integer in 0-65535, got ${port}`);
  }
  const log = (options.log ?? createLogger()).child({ component: 'broker' });
  const limits = resolveLimits(options.limits);
  const passwords =
    options.usersPath === undefined
      ? undefined
      : PasswordDirectory.fromFile(options.usersPath);
  const access = new AccessControl({
    requireIdentity:
      options.tls?.caPath !== undefined || passwords !== undefined,
    passwords,
    limits,
    log,
  });

  const redis =
    options.redisUrl === undefined
      ? undefined
      : await connectRedis({
          url: options.redisUrl,
          log,
          maxMessageBytes: Math.max(
            limits.vehicle.maxMessageBytes,
            limits.aggregator.maxMessageBytes,
          ),
        });
  let aedes: Aedes;
  try {
    aedes = await Aedes.createBroker({
      ...access.hooks(),
      ...(redis && { mq: redis.mq, persistence: redis.persistence }),
    });
  } catch (err) {
    await redis?.close(Promise.resolve());
    throw err;
  }
  // Connections the broker accepted and that are still open. aedes closes
  // only the clients that finished CONNECT; close() destroys the rest, or
  // server.close() would wait for them forever.
  const sockets = new Set<Socket>();
  attachLogging(aedes, log);
  let listener;
  try {
    listener = createListener(
      (socket) => {
        sockets.add(socket);
        socket.once('close', () => sockets.delete(socket));
        aedes.handle(socket);
      },
      options.tls,
      log,
    );
    await listen(listener.server, port, host);
  } catch (err) {
    await closeAedes(aedes, redis);
    throw err;
  }
  const { server } = listener;
  const address = server.address();
  const boundPort =
    typeof address === 'object' && address !== null ? address.port : port;
  log.info(
    {
      host,
      port: boundPort,
      tls: listener.secure,
      clientCertificates: listener.verifiesClientCertificates,
      passwordUsers: passwords?.size ?? 0,
      sharedThroughRedis: redis !== undefined,
    },
    'broker started',
  );
  warnAboutWeakSettings(options, listener.secure, access.enforcing, host, log);

  const reloadCredentials = (): { closedClients: number } => {
    const crl = listener.reload?.();
    if (options.usersPath !== undefined) {
      access.setPasswords(PasswordDirectory.fromFile(options.usersPath));
    }
    const closedClients = access.closeRevoked(crl?.revokedSerials ?? new Set());
    log.info(
      { closedClients, revokedCertificates: crl?.revokedSerials.size },
      'broker credentials reloaded',
    );
    return { closedClients };
  };

  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closing ??= (async () => {
      await closeAedes(aedes, redis);
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const socket of sockets) socket.destroy();
      await closed;
      log.info({ host, port: boundPort }, 'broker stopped');
    })();
    return closing;
  };
  return {
    port: boundPort,
    host,
    secure: listener.secure,
    reloadCredentials,
    close,
  };
}

/**
 * Logs a warning for each weak setting: no TLS or no authentication on a
 * non-loopback address, or client certificates without a CRL.
 */
export function warnAboutWeakSettings(
  options: BrokerOptions,
  secure: boolean,
  enforcing: boolean,
  host: string,
  log: Logger,
): void {
  const loopback = isLoopbackHost(host);
  if (!secure && !loopback) {
    log.warn(
      { host },
      'broker listens without tls on a non-loopback address; traffic and ' +
        'passwords cross the network in clear text',
    );
  }
  if (!enforcing && !loopback) {
    log.warn(
      { host },
      'broker has no client authentication; any client may publish and ' +
        'subscribe to any topic',
    );
  }
  if (options.tls?.caPath !== undefined && options.tls.crlPath === undefined) {
    log.warn(
      { caPath: options.tls.caPath },
      'broker has no crl; revoked client certificates are accepted',
    );
  }
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

function closeAedes(aedes: Aedes, redis?: RedisBackend): Promise<void> {
  const closed = new Promise<void>((resolve) => aedes.close(() => resolve()));
  return redis === undefined ? closed : redis.close(closed);
}

function attachLogging(aedes: Aedes, log: Logger): void {
  aedes.on('client', (client: Client) => {
    log.info({ clientId: client.id }, 'client connected');
  });
  aedes.on('clientDisconnect', (client: Client) => {
    log.info({ clientId: client.id }, 'client disconnected');
  });
  // AccessControl logs its own denials with the identity and topic.
  aedes.on('clientError', (client: Client, err: Error) => {
    if (err instanceof AccessDeniedError) return;
    // A vehicle that drops off the network is routine, not a fault.
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ECONNRESET' || code === 'EPIPE' || code === 'ETIMEDOUT') {
      log.info({ clientId: client.id, code }, 'client connection dropped');
      return;
    }
    log.warn({ clientId: client.id, err }, 'client error');
  });
  aedes.on('connectionError', (client: Client, err: Error) => {
    if (err instanceof AccessDeniedError) return;
    log.warn({ clientId: client?.id, err }, 'connection error');
  });
  // aedes emits 'error' when a persistence call of its own fails, such as
  // the periodic check of stored wills while Redis is unreachable. Without
  // a listener that error would end the process. aedes' typings omit it.
  (aedes as unknown as EventEmitter).on('error', (err: Error) => {
    log.error({ err }, 'broker persistence error');
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
