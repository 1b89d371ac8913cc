/**
 * Pieces of the broker cluster tests: a throwaway redis-server on
 * 127.0.0.1 (a free port, no snapshots, no append-only file, killed by its
 * pid), MQTT clients of the broker nodes, and a logger whose lines the
 * test can read.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { createConnection, createServer } from 'node:net';
import { Writable } from 'node:stream';

import { connect, type IClientOptions, type MqttClient } from 'mqtt';
import { pino } from 'pino';

import type { RunningBroker } from '../broker/index.ts';
import type { Logger } from '../protocol/index.ts';

/** Time allowed to redis-server to reply to PING after it starts. */
const START_TIMEOUT_MS = 10_000;
/** Time allowed to redis-server to exit after SIGTERM, then SIGKILL. */
const STOP_TIMEOUT_MS = 5_000;

/** A redis-server process the test started. */
export interface TestRedis {
  readonly port: number;
  /** `redis://127.0.0.1:<port>`. */
  readonly url: string;
  /** Stops the process by its pid; safe to call twice. */
  stop(): Promise<void>;
}

/**
 * Throws with the install command when redis-server is not on PATH.
 * CI installs Debian's redis-server, so a missing binary is a failure of
 * the machine, not a reason to skip.
 */
export function requireRedisServer(): void {
  const found = spawnSync('redis-server', ['--version'], { stdio: 'ignore' });
  if (found.error !== undefined || found.status !== 0) {
    throw new Error(
      'redis-server is not installed or not on PATH; the broker cluster ' +
        'tests need it: apt-get install -y --no-install-recommends ' +
        'redis-server',
    );
  }
}

/**
 * Starts redis-server on `port` (by default a free loopback port) and
 * waits until it replies to PING. redis-server has no port 0, so the free
 * port comes from binding a server to port 0 and closing it.
 */
export async function startTestRedis(port?: number): Promise<TestRedis> {
  requireRedisServer();
  port ??= await findFreePort();
  const child = spawn(
    'redis-server',
    [
      ...['--port', String(port)],
      ...['--bind', '127.0.0.1'],
      ...['--save', ''],
      ...['--appendonly', 'no'],
      ...['--loglevel', 'warning'],
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  // A spawn failure emits 'error' and maybe no 'exit'.
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => resolve());
    child.once('error', (err) => {
      stderr += err.message;
      resolve();
    });
  });
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk));
  // A test process that crashes or is ended by process.exit() skips its
  // after() hooks, so the server would outlive it. SIGKILL from outside
  // the test process still leaves it running.
  const killOnExit = (): void => {
    child.kill('SIGKILL');
  };
  process.once('exit', killOnExit);
  void exited.then(() => process.off('exit', killOnExit));

  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= stopProcess(child, exited);
    return stopping;
  };
  try {
    await waitForPing(port, child, START_TIMEOUT_MS);
  } catch (err) {
    await stop();
    throw new Error(`redis-server on port ${port} did not start: ${stderr}`, {
      cause: err,
    });
  }
  return { port, url: `redis://127.0.0.1:${port}`, stop };
}

/** Returns a TCP port that was free on 127.0.0.1 a moment ago. */
export async function findFreePort(): Promise<number> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (typeof address !== 'object' || address === null) {
    throw new Error(`unexpected server address ${String(address)}`);
  }
  return address.port;
}

/** Sends PING every 50 ms until the reply is +PONG or time runs out. */
async function waitForPing(
  port: number,
  child: ChildProcess,
  timeoutMs: number,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = 'no attempt';
  while (Date.now() < deadline) {
    if (child.exitCode !== null) {
      throw new Error(`redis-server exited with code ${child.exitCode}`);
    }
    last = await ping(port).catch((err: Error) => err.message);
    if (last === '+PONG') return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`no PONG within ${timeoutMs} ms, last reply: ${last}`);
}

/** Sends one inline PING and resolves with the first reply line. */
function ping(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = createConnection({ port, host: '127.0.0.1' });
    socket.setTimeout(1000, () => socket.destroy(new Error('ping timed out')));
    let reply = '';
    socket.on('connect', () => socket.write('PING\r\n'));
    socket.on('data', (chunk) => {
      reply += chunk.toString('latin1');
      if (reply.includes('\r\n')) {
        socket.destroy();
        resolve(reply.split('\r\n')[0]);
      }
    });
    socket.on('error', reject);
  });
}

async function stopProcess(
  child: ChildProcess,
  exited: Promise<void>,
): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  if (child.pid === undefined) return; // never started
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
  try {
    await exited;
  } finally {
    clearTimeout(timer);
  }
}

/** Bound of each wait of the cluster tests, in ms. */
export const WAIT_MS = 10_000;

/**
 * Starts connecting an MQTT 3.1.1 client that does not reconnect on its
 * own. `sessionPresent` resolves with the CONNACK flag; listeners added
 * before awaiting it see the messages a session delivers at once.
 */
export function connectTo(
  node: RunningBroker,
  clientId: string,
  options: IClientOptions = {},
): { client: MqttClient; sessionPresent: Promise<boolean> } {
  const client = connect(`mqtt://127.0.0.1:${node.port}`, {
    protocolVersion: 4,
    clientId,
    reconnectPeriod: 0,
    connectTimeout: WAIT_MS,
    ...options,
  });
  const sessionPresent = new Promise<boolean>((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`${clientId} not connected within ${WAIT_MS} ms`)),
      WAIT_MS,
    );
    client.once('connect', (connack) => {
      clearTimeout(timer);
      resolve(connack.sessionPresent);
    });
  });
  return { client, sessionPresent };
}

/** Resolves when `client` loses its connection; rejects after WAIT_MS. */
export function closeOf(client: MqttClient): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`connection not closed within ${WAIT_MS} ms`)),
      WAIT_MS,
    );
    client.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/** Subscribes with QoS 1; returns the granted QoS of each filter. */
export async function subscribe(
  client: MqttClient,
  ...filters: string[]
): Promise<number[]> {
  const granted = client.subscribeAsync(
    Object.fromEntries(filters.map((filter) => [filter, { qos: 1 as const }])),
  );
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`no SUBACK for ${filters} within ${WAIT_MS} ms`)),
      WAIT_MS,
    );
  });
  try {
    return (await Promise.race([granted, timedOut])).map((grant) => grant.qos);
  } finally {
    clearTimeout(timer);
  }
}

/** Resolves with the payload of the next message on `topic`. */
export function nextPayload(
  client: MqttClient,
  topic: string,
): Promise<string> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      client.off('message', onMessage);
      reject(new Error(`no message on ${topic} within ${WAIT_MS} ms`));
    }, WAIT_MS);
    const onMessage = (received: string, payload: Buffer): void => {
      if (received !== topic) return;
      clearTimeout(timer);
      client.off('message', onMessage);
      resolve(payload.toString());
    };
    client.on('message', onMessage);
  });
}

/** Pino logger that keeps the message of every line, for log checks. */
export function captureLogger(): { log: Logger; messages: string[] } {
  const messages: string[] = [];
  const stream = new Writable({
    write(chunk, _encoding, done) {
      messages.push(JSON.parse(String(chunk)).msg);
      done();
    },
  });
  return { log: pino({ level: 'info' }, stream), messages };
}

/** Waits at most WAIT_MS until `messages` contains `message` `count` times. */
export async function waitForMessage(
  messages: string[],
  message: string,
  count = 1,
): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (messages.filter((line) => line === message).length < count) {
    if (Date.now() > deadline) {
      throw new Error(`no "${message}" x${count} logged within ${WAIT_MS} ms`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/**
 * Publishes every 200 ms until `subscriber` receives a message on
 * `topic`, for a path that comes back at a moment the test cannot
 * observe. Resolves with the payload received.
 */
export async function publishUntilReceived(
  publisher: MqttClient,
  subscriber: MqttClient,
  topic: string,
  payload: string,
): Promise<string> {
  const received = nextPayload(subscriber, topic);
  let done = false;
  void received.finally(() => (done = true)).catch(() => {});
  while (!done) {
    await publisher.publishAsync(topic, payload, { qos: 1 });
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  return received;
}
