import assert from 'node:assert/strict';
import { once } from 'node:events';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import type { IClientOptions, MqttClient } from 'mqtt';

import { Aggregator } from '../aggregator/index.ts';
import {
  DEFAULT_REDIS_CLOSE_TIMEOUT_MS,
  startBroker,
  type RunningBroker,
} from '../broker/index.ts';
import { loadLabelledImages, resolveDataDir, subset } from '../models/index.ts';
import { ErrorCode, FleetError } from '../protocol/index.ts';
import { endClient } from '../protocol/mqtt-end.ts';
import { VehicleAgent } from '../vehicle-agent/index.ts';
import {
  FLEET_ID,
  createWorkspace,
  fetchRetainedRelease,
  loadRealImages,
  quietLog,
  testOptions,
  type Workspace,
} from './aggregator-fixtures.ts';
import {
  WAIT_MS,
  captureLogger,
  closeOf,
  connectTo,
  findFreePort,
  nextPayload,
  publishUntilReceived,
  startTestRedis,
  subscribe,
  waitForMessage,
  type TestRedis,
} from './redis-fixtures.ts';

function startNode(redis: TestRedis): Promise<RunningBroker> {
  return startBroker({ port: 0, log: quietLog, redisUrl: redis.url });
}

describe('broker nodes sharing redis', () => {
  let redis: TestRedis;
  let nodeA: RunningBroker;
  let nodeB: RunningBroker;
  const clients: MqttClient[] = [];

  /** Connects a client that `after` ends. */
  async function open(
    node: RunningBroker,
    clientId: string,
    options?: IClientOptions,
  ): Promise<MqttClient> {
    const { client, sessionPresent } = connectTo(node, clientId, options);
    clients.push(client);
    await sessionPresent;
    return client;
  }

  before(async () => {
    redis = await startTestRedis();
    nodeA = await startNode(redis);
    nodeB = await startNode(redis);
  });

  after(async () => {
    await Promise.all(clients.map((client) => endClient(client, 2000)));
    await nodeA?.close();
    await nodeB?.close();
    await redis?.stop();
  });

  test('publish on one node reaches the other', async () => {
    const subscriber = await open(nodeA, 'sub-live');
    const publisher = await open(nodeB, 'pub-live');
    await subscribe(subscriber, 'cluster/live');

    const received = nextPayload(subscriber, 'cluster/live');
    await publisher.publishAsync('cluster/live', 'from B', { qos: 1 });

    assert.equal(await received, 'from B');
  });

  test('retained message set on A reaches B', async () => {
    const publisher = await open(nodeA, 'pub-retained');
    await publisher.publishAsync('cluster/retained', 'kept', {
      qos: 1,
      retain: true,
    });

    const subscriber = await open(nodeB, 'sub-retained');
    const received = nextPayload(subscriber, 'cluster/retained');
    await subscribe(subscriber, 'cluster/retained');

    assert.equal(await received, 'kept');
  });

  test('persistent session resumes on the other node', async () => {
    const first = await open(nodeA, 'sub-session', { clean: false });
    await subscribe(first, 'cluster/session');
    await endClient(first, 2000);

    const publisher = await open(nodeB, 'pub-session');
    await publisher.publishAsync('cluster/session', 'queued', { qos: 1 });

    // Once in about ten full runs on a loaded 2-core machine, the first
    // reconnection got no CONNACK within WAIT_MS. A second attempt must
    // still find the session and its queued message.
    let attempt = await reconnect('sub-session');
    if (attempt === undefined) attempt = await reconnect('sub-session');
    assert.ok(attempt !== undefined, 'sub-session not resumed in 2 attempts');
    assert.equal(attempt.sessionPresent, true);
    assert.equal(await attempt.received, 'queued');
  });

  /**
   * Connects `clientId` to node B with its persistent session. Returns
   * undefined, after ending the client, when no CONNACK came in time.
   */
  async function reconnect(
    clientId: string,
  ): Promise<
    { sessionPresent: boolean; received: Promise<string> } | undefined
  > {
    const { client, sessionPresent } = connectTo(nodeB, clientId, {
      clean: false,
    });
    clients.push(client);
    // The queued message follows CONNACK at once, so listen before it.
    const received = nextPayload(client, 'cluster/session');
    received.catch(() => {});
    try {
      return { sessionPresent: await sessionPresent, received };
    } catch {
      await endClient(client, 2000);
      return undefined;
    }
  }

  test('persistent session subscribes to two topics', async () => {
    const subscriber = await open(nodeA, 'sub-two', { clean: false });
    const publisher = await open(nodeB, 'pub-two');

    const granted = await subscribe(
      subscriber,
      'cluster/two/first',
      'cluster/two/second',
    );
    const received = nextPayload(subscriber, 'cluster/two/second');
    await publisher.publishAsync('cluster/two/second', 'both', { qos: 1 });

    assert.deepEqual(granted, [1, 1]);
    assert.equal(await received, 'both');
  });

  test('client id taken over across nodes', async () => {
    const first = await open(nodeA, 'same-id');
    const firstClosed = closeOf(first);

    const second = await open(nodeB, 'same-id');
    await firstClosed;

    assert.equal(first.connected, false);
    assert.equal(second.connected, true);
  });

  test('unreachable redis fails the start', async () => {
    const port = await findFreePort(); // nothing listens there
    const startedAtMs = Date.now();

    await assert.rejects(
      startBroker({
        port: 0,
        log: quietLog,
        redisUrl: `redis://127.0.0.1:${port}`,
      }),
      (err: unknown) =>
        err instanceof FleetError &&
        err.code === ErrorCode.InvalidConfig &&
        err.message.includes(`127.0.0.1:${port}`),
    );
    assert.ok(Date.now() - startedAtMs < WAIT_MS);
  });

  test('non-redis url rejected', async () => {
    await assert.rejects(
      startBroker({
        port: 0,
        log: quietLog,
        redisUrl: 'http://user:secret@127.0.0.1:6379',
      }),
      (err: unknown) =>
        err instanceof FleetError &&
        err.code === ErrorCode.InvalidConfig &&
        err.message.includes('http://user:***@127.0.0.1:6379') &&
        !err.message.includes('secret'),
    );
  });

  test('non-numeric database rejected', async () => {
    await assert.rejects(
      startBroker({
        port: 0,
        log: quietLog,
        redisUrl: 'redis://127.0.0.1:6379/abc',
      }),
      (err: unknown) =>
        err instanceof FleetError &&
        err.code === ErrorCode.InvalidConfig &&
        /names database "abc"/.test(err.message),
    );
  });

  test('close ends when redis is gone', async () => {
    const ownRedis = await startTestRedis();
    const node = await startNode(ownRedis);
    const { client, sessionPresent } = connectTo(node, 'orphan');
    await sessionPresent;
    await ownRedis.stop();
    const startedAtMs = Date.now();

    await node.close();
    await endClient(client, 2000);

    assert.ok(Date.now() - startedAtMs < DEFAULT_REDIS_CLOSE_TIMEOUT_MS);
  });

  test('warns when redis would drop large messages', async () => {
    const defaults = captureLogger();
    const small = captureLogger();
    const oneMiB = { maxMessageBytes: 1024 * 1024 };

    // Default limit 64 MiB, above the 32 MiB pubsub limit of redis.
    await (
      await startBroker({ port: 0, log: defaults.log, redisUrl: redis.url })
    ).close();
    await (
      await startBroker({
        port: 0,
        log: small.log,
        redisUrl: redis.url,
        limits: { vehicle: oneMiB, aggregator: oneMiB },
      })
    ).close();

    const warned = (messages: string[]): boolean =>
      messages.some((message) => message.startsWith('redis drops messages'));
    assert.equal(warned(defaults.messages), true);
    assert.equal(warned(small.messages), false);
  });

  test('nodes recover after a redis restart', async () => {
    const ownRedis = await startTestRedis();
    const captured = captureLogger();
    const node = await startBroker({
      port: 0,
      log: captured.log,
      redisUrl: ownRedis.url,
    });
    const other = await startNode(ownRedis);
    let restarted: TestRedis | undefined;
    try {
      const subscriber = await open(node, 'sub-restart');
      const publisher = await open(other, 'pub-restart');
      await subscribe(subscriber, 'cluster/restart');

      await ownRedis.stop();
      await waitForMessage(captured.messages, 'redis reconnecting');
      restarted = await startTestRedis(ownRedis.port);
      await waitForMessage(captured.messages, 'redis connection restored', 3);

      const received = await publishUntilReceived(
        publisher,
        subscriber,
        'cluster/restart',
        'back',
      );

      assert.equal(received, 'back');
    } finally {
      await node.close();
      await other.close();
      await restarted?.stop();
    }
  });
});

/** Resolves when `agent` deploys `version`; rejects after 60 s. */
function deploymentOf(agent: VehicleAgent, version: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`no deployment of v${version} within 60 s`)),
      60_000,
    );
    agent.on('release-deployed', (event) => {
      if (event.version !== version) return;
      clearTimeout(timer);
      resolve();
    });
  });
}

describe('federated round across two broker nodes', () => {
  const VEHICLES_A = ['veh-a1', 'veh-a2'];
  const VEHICLES_B = ['veh-b1', 'veh-b2'];
  let redis: TestRedis;
  let nodeA: RunningBroker;
  let nodeB: RunningBroker;
  let workspace: Workspace;
  let aggregator: Aggregator | undefined;
  const agents: VehicleAgent[] = [];

  before(async () => {
    redis = await startTestRedis();
    nodeA = await startNode(redis);
    nodeB = await startNode(redis);
    workspace = createWorkspace(11);
  });

  after(async () => {
    await aggregator?.stop();
    await Promise.all(agents.map((agent) => agent.stop()));
    await nodeA?.close();
    await nodeB?.close();
    await redis?.stop();
    workspace?.remove();
  });

  test(
    'vehicles on both nodes deploy the new model',
    { timeout: 120_000 },
    async () => {
      const images = await loadRealImages();
      const frames = await loadLabelledImages(resolveDataDir(), {
        limit: 400,
      });
      const ids = [...VEHICLES_A, ...VEHICLES_B];
      for (const [index, vehicleId] of ids.entries()) {
        const node = VEHICLES_A.includes(vehicleId) ? nodeA : nodeB;
        const own = Array.from({ length: 100 }, (_, i) => index * 100 + i);
        agents.push(
          new VehicleAgent({
            vehicleId,
            fleetId: FLEET_ID,
            brokerUrl: `mqtt://127.0.0.1:${node.port}`,
            stateDir: join(workspace.dir, vehicleId),
            frames: subset(frames, own),
            seed: index + 1,
            log: quietLog,
          }),
        );
      }
      const deployed = Promise.all(
        agents.map((agent) => deploymentOf(agent, 1)),
      );
      deployed.catch(() => {}); // awaited below, after the round closes
      await Promise.all(agents.map((agent) => agent.start()));

      aggregator = new Aggregator(
        testOptions(nodeA, workspace, images, {
          minVehiclesOnline: ids.length,
          minUpdates: ids.length,
          roundTimeoutMs: 60_000,
        }),
      );
      const roundClosed = once(aggregator, 'round-closed', {
        signal: AbortSignal.timeout(60_000),
      });
      roundClosed.catch(() => {}); // awaited below, after start()
      await aggregator.start();
      const [closed] = await roundClosed;
      await deployed;

      assert.equal(closed.modelVersion, 1);
      assert.deepEqual(closed.selected, [...ids].sort());
      assert.equal(closed.accepted, ids.length);
      assert.equal((await fetchRetainedRelease(nodeB)).version, 1);
    },
  );
});
