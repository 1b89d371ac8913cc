/**
 * Redis backing of a broker node. Broker processes that share one Redis
 * act as one broker: mqemitter-redis carries every published message to
 * every node, and aedes-persistence-redis keeps retained messages,
 * subscriptions, persistent sessions, queued QoS 1 messages and last wills
 * where every node reads them. The live client table and the access
 * control state stay in each node's memory.
 */
import type { EventEmitter } from 'node:events';
import aedesPersistenceRedis, {
  type RedisPersistence,
} from 'aedes-persistence-redis';
import { Redis } from 'ioredis';
import MQEmitterRedis from 'mqemitter-redis';
import { ErrorCode, FleetError, type Logger } from '../protocol/index.ts';
import { settleWithin } from '../protocol/mqtt-end.ts';
import { RepeatedLogLimiter } from './log-limiter.ts';

/** Default bound of the first connection to Redis, in ms. */
export const DEFAULT_REDIS_CONNECT_TIMEOUT_MS = 5000;
/** Default bound of each step of closing the Redis backing, in ms. */
export const DEFAULT_REDIS_CLOSE_TIMEOUT_MS = 5000;

/** aedes' own default for its in-memory mqemitter. */
const MQ_CONCURRENCY = 100;

/** Options of {@link connectRedis}. */
export interface RedisBackendOptions {
  /** `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS. */
  url: string;
  /** Broker logger; lines get a `redis` field with the password hidden. */
  log: Logger;
  /** Time allowed to open the connections. Default 5000 ms. */
  connectTimeoutMs?: number;
  /** Time allowed to each step of `close()`. Default 5000 ms. */
  closeTimeoutMs?: number;
}

/** The Redis parts a broker node hands to aedes. */
export interface RedisBackend {
  /** aedes `mq` option: message distribution across nodes. */
  readonly mq: MQEmitterRedis.MQEmitterRedis;
  /** aedes `persistence` option: state shared by the nodes. */
  readonly persistence: RedisPersistence;
  /**
   * Closes the Redis connections once `aedesClosed` settles, or after the
   * close timeout when Redis does not answer: aedes' close quits the
   * message connections and waits for Redis to confirm.
   */
  close(aedesClosed: Promise<void>): Promise<void>;
}

type ConnectionName = 'publish' | 'subscribe' | 'persistence';

interface Connection {
  name: ConnectionName;
  redis: Redis;
}

/**
 * Parses a Redis URL.
 *
 * @throws {FleetError} INVALID_CONFIG naming the value when it is not a
 *   `redis://` or `rediss://` URL.
 */
export function parseRedisUrl(text: string): URL {
  let url: URL | undefined;
  try {
    url = new URL(text);
  } catch {
    url = undefined;
  }
  if (url === undefined || !['redis:', 'rediss:'].includes(url.protocol)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `redis url ${JSON.stringify(redactRedisUrl(text))} is not a ` +
        'redis:// or rediss:// URL, for example redis://127.0.0.1:6379',
    );
  }
  return url;
}

/** The URL as text with its password, if any, replaced by `***`. */
export function redactRedisUrl(text: string): string {
  try {
    const url = new URL(text);
    if (url.password !== '') url.password = '***';
    return url.href;
  } catch {
    // Not a URL: hide whatever sits between "://" and the last "@".
    return text.replace(/\/\/.*@/, '//***@');
  }
}

/**
 * Opens three connections to Redis (publish, subscribe, persistence) and
 * builds the aedes `mq` and `persistence` on them. The connections
 * reconnect on their own after a loss; each loss and recovery is logged.
 *
 * @throws {FleetError} INVALID_CONFIG for a bad URL, or when Redis does not
 *   accept all connections within `connectTimeoutMs`.
 */
export async function connectRedis(
  options: RedisBackendOptions,
): Promise<RedisBackend> {
  const url = parseRedisUrl(options.url);
  const where = redactRedisUrl(url.href);
  const log = options.log.child({ redis: where });
  const connectTimeoutMs =
    options.connectTimeoutMs ?? DEFAULT_REDIS_CONNECT_TIMEOUT_MS;
  const closeTimeoutMs =
    options.closeTimeoutMs ?? DEFAULT_REDIS_CLOSE_TIMEOUT_MS;

  const names: ConnectionName[] = ['publish', 'subscribe', 'persistence'];
  const connections = names.map((name) => ({
    name,
    redis: new Redis(url.href, {
      lazyConnect: true,
      connectTimeout: connectTimeoutMs,
      // Batches the publishes of one tick, as mqemitter-redis does for
      // connections it opens itself.
      enableAutoPipelining: name === 'publish',
    }),
  }));
  const lastErrors = watchConnections(connections, log);
  await openConnections(connections, connectTimeoutMs, where, lastErrors);

  const [publish, subscribe, persistenceConnection] = connections;
  const mq = MQEmitterRedis({
    pubConn: publish.redis,
    subConn: subscribe.redis,
    concurrency: MQ_CONCURRENCY,
    matchEmptyLevels: true, // as aedes' default mqemitter [MQTT-4.7.1-3]
  });
  // mqemitter-redis re-emits connection errors on `state`, an emitter its
  // typings omit, and an 'error' without a listener would crash the
  // process. The connections' own listeners already log those errors.
  (mq as unknown as { state: EventEmitter }).state.on('error', (err) =>
    log.debug({ err }, 'redis message distribution error'),
  );
  const persistence = aedesPersistenceRedis({
    conn: persistenceConnection.redis,
  });
  log.info({ connections: connections.length }, 'redis connected');

  return {
    mq,
    persistence,
    close: (aedesClosed) =>
      closeBackend(aedesClosed, persistence, connections, closeTimeoutMs, log),
  };
}

/**
 * Logs errors, reconnects and recoveries of each connection. An
 * unreachable Redis fails every retry (every 2 s at most), so repeats of
 * one message are logged at most once per 30 s. Returns the last error
 * of each connection, for the start-up error.
 */
function watchConnections(
  connections: Connection[],
  log: Logger,
): Map<ConnectionName, Error> {
  const lastErrors = new Map<ConnectionName, Error>();
  const limiter = new RepeatedLogLimiter();
  for (const { name, redis } of connections) {
    let lost = false;
    redis.on('error', (err: Error) => {
      lastErrors.set(name, err);
      const skipped = limiter.admit(`error\u0000${name}\u0000${err.message}`);
      if (skipped === undefined) return;
      log.warn({ connection: name, err, skipped }, 'redis connection error');
    });
    redis.on('reconnecting', (delayMs: number) => {
      lost = true;
      const skipped = limiter.admit(`reconnecting\u0000${name}`);
      if (skipped === undefined) return;
      log.warn({ connection: name, delayMs, skipped }, 'redis reconnecting');
    });
    redis.on('ready', () => {
      if (!lost) return;
      lost = false;
      log.info({ connection: name }, 'redis connection restored');
    });
  }
  return lastErrors;
}

/**
 * Connects every connection, or disconnects them all and throws. ioredis
 * rejects a first connect that fails at once (refused), and the timer
 * bounds one that hangs (a host that drops packets).
 */
async function openConnections(
  connections: Connection[],
  timeoutMs: number,
  where: string,
  lastErrors: Map<ConnectionName, Error>,
): Promise<void> {
  const connecting = Promise.all(
    connections.map(({ redis }) => redis.connect()),
  );
  let failure: unknown;
  try {
    if (await settleWithin(connecting, timeoutMs)) return;
  } catch (err) {
    failure = err;
  }
  for (const { redis } of connections) redis.disconnect();
  connecting.catch(() => {}); // settled or abandoned; already reported

  const cause = [...lastErrors.values()][0] ?? failure;
  const reason =
    failure === undefined
      ? `no answer within ${timeoutMs} ms`
      : (cause as Error).message;
  throw new FleetError(
    ErrorCode.InvalidConfig,
    `cannot connect to redis at ${where} (${reason}); start redis-server ` +
      'there or pass the address of a running one with --redis-url',
    { cause },
  );
}

/** Closes the backing in bounded steps; see {@link RedisBackend.close}. */
async function closeBackend(
  aedesClosed: Promise<void>,
  persistence: RedisPersistence,
  connections: Connection[],
  timeoutMs: number,
  log: Logger,
): Promise<void> {
  if (!(await settleWithin(aedesClosed, timeoutMs))) {
    log.warn(
      { durationMs: timeoutMs },
      'redis did not confirm the broker close in time, disconnecting',
    );
  }
  try {
    await settleWithin(persistence.destroy(), timeoutMs);
  } catch (err) {
    // The message connections are already closed, so removing the
    // persistence's listeners from them can fail; nothing is lost.
    log.debug({ err }, 'redis persistence close failed');
  }
  for (const { redis } of connections) redis.disconnect();
  // Disconnecting ends the quits aedes waits for, so its close finishes.
  await settleWithin(aedesClosed, timeoutMs);
  log.info('redis disconnected');
}
