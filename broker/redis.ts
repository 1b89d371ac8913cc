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
/** Time after which an unconfirmed subscription change stops blocking. */
const SUBSCRIPTION_CHANGE_TIMEOUT_MS = 10_000;

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
  /**
   * Largest PUBLISH payload the broker admits, in bytes. A warning is
   * logged when Redis would drop messages of that size.
   */
  maxMessageBytes?: number;
}

/** The Redis parts a broker node hands to aedes. */
export interface RedisBackend {
  /** aedes `mq` option: message distribution across nodes. */
  readonly mq: MQEmitterRedis.MQEmitterRedis;
  /** aedes `persistence` option: state shared by the nodes. */
  readonly persistence: RedisPersistence;
  /**
   * Closes the Redis connections once `aedesClosed` settles, or after the
   * close timeout when Redis does not respond. The wait exists because
   * aedes' close quits the message connections and waits for Redis.
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
  const quoted = JSON.stringify(redactRedisUrl(text));
  if (url === undefined) {
    // new URL also rejects a port above 65535, so the message names both.
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `redis url ${quoted} is not a valid URL (check the host and a port ` +
        'from 1 to 65535), for example redis://127.0.0.1:6379',
    );
  }
  if (!['redis:', 'rediss:'].includes(url.protocol)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `redis url ${quoted} is not a redis:// or rediss:// URL, for ` +
        'example redis://127.0.0.1:6379',
    );
  }
  if (!/^\/?(\d{1,5})?$/.test(url.pathname)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `redis url ${quoted} names database ${JSON.stringify(url.pathname.slice(1))}; ` +
        'expected a database number such as /0, or none',
    );
  }
  return url;
}

/** Returns the URL with its password, if any, replaced by `***`. */
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
  queueSubscriptionChanges(persistence, SUBSCRIPTION_CHANGE_TIMEOUT_MS, log);
  log.info({ connections: connections.length }, 'redis connected');
  if (options.maxMessageBytes !== undefined) {
    await warnAboutPubSubLimit(
      publish.redis,
      options.maxMessageBytes,
      connectTimeoutMs,
      log,
    );
  }

  return {
    mq,
    persistence,
    close: (aedesClosed) =>
      closeBackend(aedesClosed, persistence, connections, closeTimeoutMs, log),
  };
}

/**
 * Makes the subscription changes of one client run one at a time, and
 * stores a SUBSCRIBE packet once.
 *
 * aedes 1.2 stores a persistent session's SUBSCRIBE once per topic in it,
 * each time with the whole packet. aedes-persistence-redis 11 then waits
 * for its broadcast of the change to come back through Redis, keyed by
 * client id and first topic. A second wait with the same key replaces the
 * first, so the first never ends. Without this queue, a persistent
 * session that subscribes to two topics at once never gets its SUBACK.
 * A change whose broadcast does not return within `stepTimeoutMs` stays
 * pending for its client but no longer blocks the queue.
 */
function queueSubscriptionChanges(
  persistence: RedisPersistence,
  stepTimeoutMs: number,
  log: Logger,
): void {
  const add = persistence.addSubscriptions.bind(persistence);
  const remove = persistence.removeSubscriptions.bind(persistence);
  const queueTails = new Map<string, Promise<unknown>>();
  const storedPackets = new WeakMap<object[], Promise<unknown>>();

  const enqueue = (clientId: string, change: () => Promise<unknown>) => {
    const previous = queueTails.get(clientId) ?? Promise.resolve();
    const result = previous.then(change);
    const tail = settleWithin(result, stepTimeoutMs).then(
      (inTime) => {
        if (!inTime) {
          log.warn(
            { clientId, durationMs: stepTimeoutMs },
            'redis subscription change not confirmed in time',
          );
        }
      },
      () => {}, // aedes receives the error through `result`
    );
    queueTails.set(clientId, tail);
    void tail.then(() => {
      if (queueTails.get(clientId) === tail) queueTails.delete(clientId);
    });
    return result;
  };

  persistence.addSubscriptions = (client, subscriptions) => {
    let stored = storedPackets.get(subscriptions);
    if (stored === undefined) {
      stored = enqueue(client.id, () => add(client, subscriptions));
      storedPackets.set(subscriptions, stored);
    }
    return stored;
  };
  persistence.removeSubscriptions = (client, topics) =>
    enqueue(client.id, () => remove(client, topics));
}

/**
 * Logs a warning when a message of `maxMessageBytes` would exceed the
 * hard `client-output-buffer-limit` of Redis for pub/sub clients (32 MiB
 * by default in Redis 7.0). Redis then drops the subscribing connection
 * of every node, and the message is lost for all subscribers. A Redis
 * that rejects CONFIG GET is not checked.
 */
async function warnAboutPubSubLimit(
  redis: Redis,
  maxMessageBytes: number,
  timeoutMs: number,
  log: Logger,
): Promise<void> {
  let limits: string;
  try {
    const reply = redis.config('GET', 'client-output-buffer-limit');
    if (!(await settleWithin(reply, timeoutMs))) {
      log.debug({ durationMs: timeoutMs }, 'redis pubsub limit not read');
      return;
    }
    limits = String(((await reply) as string[])[1] ?? '');
  } catch (err) {
    log.debug({ err }, 'redis pubsub limit not readable');
    return;
  }
  // "normal 0 0 0 replica 268435456 67108864 60 pubsub 33554432 8388608 60"
  const fields = limits.split(' ');
  const hardLimitBytes = Number(fields[fields.indexOf('pubsub') + 1]);
  if (!(hardLimitBytes > 0) || maxMessageBytes < hardLimitBytes) return;
  log.warn(
    { maxMessageBytes, pubsubHardLimitBytes: hardLimitBytes },
    'redis drops messages this large; lower --max-message-bytes below ' +
      'the pubsub client-output-buffer-limit of redis, or raise that limit',
  );
}

/**
 * Logs errors, reconnects and recoveries of each connection. ioredis 5
 * retries an unreachable Redis every 2 s at most by default, so a
 * connection logs each distinct message at most once per 30 s. Returns the last
 * error of each connection, for the start-up error.
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

/**
 * Closes the backing in bounded steps; see {@link RedisBackend.close}.
 * With Redis unreachable, no reply from it is awaited. The connections
 * are dropped at once, which fails the commands they queued, so aedes can
 * finish closing its clients.
 */
async function closeBackend(
  aedesClosed: Promise<void>,
  persistence: RedisPersistence,
  connections: Connection[],
  timeoutMs: number,
  log: Logger,
): Promise<void> {
  const reachable = connections.every(({ redis }) => redis.status === 'ready');
  if (!reachable) {
    log.warn('redis unreachable at close, disconnecting without waiting');
  } else if (!(await settleWithin(aedesClosed, timeoutMs))) {
    log.warn(
      { durationMs: timeoutMs },
      'redis did not confirm the broker close in time, disconnecting',
    );
  }
  if (reachable) await destroyPersistence(persistence, timeoutMs, log);
  for (const { redis } of connections) redis.disconnect();
  // aedes waits for an 'end' of its quits that a dropped connection may
  // never emit. The broker is closed either way, so this wait is short.
  await settleWithin(aedesClosed, Math.min(timeoutMs, 1000));
  log.info('redis disconnected');
}

async function destroyPersistence(
  persistence: RedisPersistence,
  timeoutMs: number,
  log: Logger,
): Promise<void> {
  try {
    await settleWithin(persistence.destroy(), timeoutMs);
  } catch (err) {
    // destroy() removes a listener from the message connections, which
    // aedes has closed already. Its data is in Redis, so none is lost.
    log.debug({ err }, 'redis persistence close failed');
  }
}
