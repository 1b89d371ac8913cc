import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import type { MqttClient } from 'mqtt';

import { RepeatedLogLimiter } from '../broker/log-limiter.ts';
import {
  PasswordDirectory,
  TokenBucket,
  createPasswordUser,
  filterCoversFilter,
  filterMatchesTopic,
  isPublishAllowed,
  isSubscribeAllowed,
  saveUser,
  startBroker,
  topicRulesOf,
  type RunningBroker,
} from '../broker/index.ts';
import { loadLabelledImages, resolveDataDir } from '../models/index.ts';
import {
  FleetTopics,
  createLogger,
  type FleetIdentity,
} from '../protocol/index.ts';
import { VehicleAgent } from '../vehicle-agent/index.ts';
import {
  brokerTlsOf,
  captureLog,
  createTestPki,
  delay,
  tlsClientOptions,
  tryConnect,
  waitForClose,
  type CapturedLog,
  type TestPki,
} from './tls-fixtures.ts';
import { endClient } from '../protocol/mqtt-end.ts';

const FLEET_ID = 'acl-fleet';
const topics = new FleetTopics(FLEET_ID);
const PASSWORDS = {
  devVehicle: 'vehicle three secret',
  intruder: 'intruder secret 42',
};

/** Messages a client received, in order. */
function collectMessages(
  client: MqttClient,
): { topic: string; bytes: number }[] {
  const received: { topic: string; bytes: number }[] = [];
  client.on('message', (topic, payload) =>
    received.push({ topic, bytes: payload.length }),
  );
  return received;
}

/**
 * Subscribes and returns the granted QoS per filter, 128 for a denied one.
 * mqtt.js rejects when any filter is denied, with the SUBACK attached.
 */
async function subscribeGranted(
  client: MqttClient,
  filters: string[],
): Promise<number[]> {
  try {
    const granted = await client.subscribeAsync(filters, { qos: 1 });
    return granted.map((grant) => grant.qos);
  } catch (err) {
    const packet = (err as { packet?: { granted?: number[] } }).packet;
    if (packet?.granted === undefined) throw err;
    return packet.granted;
  }
}

async function waitUntil(
  condition: () => boolean,
  what: string,
  timeoutMs = 5000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await delay(20);
  }
}

describe('topic filters', () => {
  test('filter matches topic table', () => {
    const cases: [string, string, boolean][] = [
      ['a/b', 'a/b', true],
      ['a/+', 'a/b', true],
      ['a/+', 'a/b/c', false],
      ['a/#', 'a', true],
      ['a/#', 'a/b/c', true],
      ['+/b', '$SYS/b', false],
      ['#', '$SYS/x', false],
      ['a/b', 'a/b/c', false],
    ];
    for (const [filter, topic, expected] of cases) {
      assert.equal(
        filterMatchesTopic(filter, topic),
        expected,
        `${filter} vs ${topic}`,
      );
    }
  });

  test('filter covers filter table', () => {
    const cases: [string, string, boolean][] = [
      ['a/#', 'a/#', true],
      ['a/#', 'a/+/c', true],
      ['a/#', 'a', true],
      ['a/+', 'a/#', false],
      ['a/+', 'a/b', true],
      ['a/b', 'a/+', false],
      ['a/+/c', 'a/+/c', true],
      ['a/+/c', 'a/+/d', false],
      ['a/b', 'a/b/#', false],
    ];
    for (const [outer, inner, expected] of cases) {
      assert.equal(
        filterCoversFilter(outer, inner),
        expected,
        `${outer} covers ${inner}`,
      );
    }
  });

  test('vehicle rules allow own topics', () => {
    const rules = topicRulesOf({
      role: 'vehicle',
      fleetId: FLEET_ID,
      vehicleId: 'veh-001',
    });
    const other = new FleetTopics('other-fleet');

    assert.ok(isPublishAllowed(rules, topics.update('veh-001')));
    assert.ok(isPublishAllowed(rules, topics.status('veh-001')));
    assert.ok(!isPublishAllowed(rules, topics.update('veh-002')));
    assert.ok(!isPublishAllowed(rules, topics.ack('veh-001')));
    assert.ok(!isPublishAllowed(rules, topics.roundTask()));
    assert.ok(!isPublishAllowed(rules, other.update('veh-001')));
    assert.ok(isSubscribeAllowed(rules, topics.roundTask()));
    assert.ok(isSubscribeAllowed(rules, topics.release()));
    assert.ok(isSubscribeAllowed(rules, `${topics.prefix}/releases/#`));
    assert.ok(
      isSubscribeAllowed(rules, `${topics.prefix}/releases/v3/chunks/+`),
    );
    assert.ok(isSubscribeAllowed(rules, topics.ack('veh-001')));
    assert.ok(!isSubscribeAllowed(rules, topics.ack('veh-002')));
    assert.ok(!isSubscribeAllowed(rules, `${topics.prefix}/vehicles/+/ack`));
    assert.ok(!isSubscribeAllowed(rules, `${topics.prefix}/#`));
    assert.ok(!isSubscribeAllowed(rules, '$SYS/#'));
  });

  test('aggregator rules allow its role', () => {
    const rules = topicRulesOf({ role: 'aggregator', fleetId: FLEET_ID });

    assert.ok(isPublishAllowed(rules, topics.roundTask()));
    assert.ok(isPublishAllowed(rules, topics.release()));
    assert.ok(isPublishAllowed(rules, `${topics.prefix}/releases/v2/chunks/0`));
    assert.ok(isPublishAllowed(rules, topics.ack('veh-007')));
    assert.ok(!isPublishAllowed(rules, topics.update('veh-007')));
    assert.ok(!isPublishAllowed(rules, topics.status('veh-007')));
    assert.ok(isSubscribeAllowed(rules, topics.allUpdates()));
    assert.ok(isSubscribeAllowed(rules, topics.allStatus()));
    assert.ok(isSubscribeAllowed(rules, topics.update('veh-007')));
    assert.ok(!isSubscribeAllowed(rules, `${topics.prefix}/vehicles/#`));
  });
});

describe('token bucket', () => {
  test('token bucket refills at rate', () => {
    let nowMs = 0;
    const bucket = new TokenBucket(3, 2, () => nowMs);

    const burst = [1, 2, 3, 4].map(() => bucket.tryTake());
    nowMs = 400; // 0.8 tokens
    const early = bucket.tryTake();
    nowMs = 500; // 1.0 token
    const refilled = bucket.tryTake();
    nowMs = 60_000;
    const capped = [1, 2, 3, 4].map(() => bucket.tryTake());

    assert.deepEqual(burst, [true, true, true, false]);
    assert.equal(early, false);
    assert.equal(refilled, true);
    assert.deepEqual(capped, [true, true, true, false]);
  });

  test('log limiter skips repeats', () => {
    let nowMs = 0;
    const limiter = new RepeatedLogLimiter(30_000, () => nowMs);

    const first = limiter.admit('a');
    const repeats = [limiter.admit('a'), limiter.admit('a')];
    const other = limiter.admit('b');
    nowMs = 30_000;
    const later = limiter.admit('a');

    assert.equal(first, 0);
    assert.deepEqual(repeats, [undefined, undefined]);
    assert.equal(other, 0);
    assert.equal(later, 2);
  });

  test('token bucket rejects bad capacity', () => {
    assert.throws(() => new TokenBucket(0, 1), RangeError);
    assert.throws(() => new TokenBucket(1, -1), RangeError);
  });
});

describe('broker acl over mutual tls', () => {
  let pki: TestPki;
  let broker: RunningBroker;
  let captured: CapturedLog;
  let url: string;
  let aggregator: MqttClient;
  let aggregatorInbox: { topic: string; bytes: number }[];
  const clients: MqttClient[] = [];

  const connectVehicle = async (
    vehicleId: string,
    clientId = `vehicle-${vehicleId}`,
  ): Promise<MqttClient> => {
    const outcome = await tryConnect(url, {
      clientId,
      ...tlsClientOptions(pki.vehicles.get(vehicleId)!),
    });
    assert.equal(outcome.connected, true, String(outcome.error));
    clients.push(outcome.client);
    return outcome.client;
  };

  before(async () => {
    pki = await createTestPki(FLEET_ID, ['veh-001', 'veh-002']);
    const usersPath = path.join(pki.dir, 'users.json');
    const users: [string, string, FleetIdentity][] = [
      [
        'dev-veh-003',
        PASSWORDS.devVehicle,
        { role: 'vehicle', fleetId: FLEET_ID, vehicleId: 'veh-003' },
      ],
      [
        'intruder',
        PASSWORDS.intruder,
        { role: 'vehicle', fleetId: 'other-fleet', vehicleId: 'veh-001' },
      ],
    ];
    for (const [username, password, identity] of users) {
      saveUser(
        usersPath,
        await createPasswordUser(username, password, identity),
      );
    }
    captured = captureLog();
    broker = await startBroker({
      port: 0,
      log: captured.log,
      tls: brokerTlsOf(pki, { requireClientCertificate: false }),
      usersPath,
      limits: {
        vehicle: {
          maxMessageBytes: 4096,
          publishesPerSecond: 1,
          publishBurst: 5,
        },
      },
    });
    url = `mqtts://127.0.0.1:${broker.port}`;

    const outcome = await tryConnect(url, {
      clientId: `aggregator-${FLEET_ID}`,
      ...tlsClientOptions(pki.aggregator),
    });
    assert.equal(outcome.connected, true, String(outcome.error));
    aggregator = outcome.client;
    aggregatorInbox = collectMessages(aggregator);
    await aggregator.subscribeAsync([topics.allUpdates(), topics.allStatus()], {
      qos: 1,
    });
  });

  after(async () => {
    await Promise.all(clients.map((client) => client.endAsync(true)));
    await aggregator.endAsync(true);
    await broker.close();
    pki.remove();
  });

  test('vehicle publishes own update', async () => {
    const vehicle = await connectVehicle('veh-001');

    await vehicle.publishAsync(topics.update('veh-001'), Buffer.alloc(100), {
      qos: 1,
    });

    await waitUntil(
      () => aggregatorInbox.some((m) => m.topic === topics.update('veh-001')),
      'update at the aggregator',
    );
    await endClient(vehicle, 2000);
  });

  test('publish to other vehicle denied', async () => {
    const vehicle = await connectVehicle('veh-001');
    const closed = waitForClose(vehicle);

    vehicle.publish(topics.update('veh-002'), Buffer.alloc(100), { qos: 1 });
    await closed;

    const line = await captured.waitFor('publish denied');
    assert.equal(line.clientId, 'vehicle-veh-001');
    assert.equal(line.identity, `urn:fleetlearn:${FLEET_ID}:vehicle:veh-001`);
    assert.equal(line.topic, topics.update('veh-002'));
    assert.equal(line.level, 40);
    await delay(100);
    assert.ok(
      !aggregatorInbox.some((m) => m.topic === topics.update('veh-002')),
    );
  });

  test('subscribe to other ack denied', async () => {
    const vehicle = await connectVehicle('veh-001');
    const inbox = collectMessages(vehicle);

    const granted = await subscribeGranted(vehicle, [
      topics.ack('veh-002'),
      topics.ack('veh-001'),
      `${topics.prefix}/#`,
    ]);
    await aggregator.publishAsync(topics.ack('veh-002'), 'b', { qos: 1 });
    await aggregator.publishAsync(topics.ack('veh-001'), 'a', { qos: 1 });
    await waitUntil(() => inbox.length > 0, 'own ack');
    await delay(100);

    assert.deepEqual(granted, [128, 1, 128]);
    assert.deepEqual(
      inbox.map((m) => m.topic),
      [topics.ack('veh-001')],
    );
    const line = await captured.waitFor(
      'subscribe denied',
      (entry) => entry.topic === topics.ack('veh-002'),
    );
    assert.equal(line.clientId, 'vehicle-veh-001');
    assert.equal(vehicle.connected, true);
    await endClient(vehicle, 2000);
  });

  test('vehicle receives rounds and releases', async () => {
    const vehicle = await connectVehicle('veh-002');
    const inbox = collectMessages(vehicle);
    const chunk = `${topics.prefix}/releases/v1/chunks/0`;

    await vehicle.subscribeAsync(
      [topics.roundTask(), `${topics.prefix}/releases/#`],
      { qos: 1 },
    );
    await aggregator.publishAsync(topics.roundTask(), 'r', { qos: 1 });
    await aggregator.publishAsync(chunk, 'c', { qos: 1 });
    await waitUntil(() => inbox.length === 2, 'round task and chunk');

    assert.deepEqual(
      inbox.map((m) => m.topic),
      [topics.roundTask(), chunk],
    );
    await endClient(vehicle, 2000);
  });

  test('aggregator cannot forge updates', async () => {
    const outcome = await tryConnect(url, {
      clientId: `aggregator-${FLEET_ID}-2`,
      ...tlsClientOptions(pki.aggregator),
    });

    assert.equal(outcome.connected, false);
    assert.equal(outcome.error?.code, 2);

    // The connected aggregator is closed after a forged update.
    const closed = waitForClose(aggregator);
    aggregator.publish(topics.update('veh-001'), 'x', { qos: 1 });
    await closed;
    await captured.waitFor(
      'publish denied',
      (line) => line.clientId === `aggregator-${FLEET_ID}`,
    );
    const again = await tryConnect(url, {
      clientId: `aggregator-${FLEET_ID}`,
      ...tlsClientOptions(pki.aggregator),
    });
    assert.equal(again.connected, true, String(again.error));
    aggregator = again.client;
    aggregatorInbox = collectMessages(aggregator);
    await aggregator.subscribeAsync([topics.allUpdates(), topics.allStatus()], {
      qos: 1,
    });
  });

  test('will on foreign topic rejected', async () => {
    const outcome = await tryConnect(url, {
      clientId: 'vehicle-veh-001',
      will: {
        topic: topics.status('veh-002'),
        payload: Buffer.from('x'),
        qos: 1,
        retain: true,
      },
      ...tlsClientOptions(pki.vehicles.get('veh-001')!),
    });

    assert.equal(outcome.connected, false);
    assert.equal(outcome.error?.code, 5);
    await captured.waitFor('client rejected, last will denied');
  });

  test('will on own status published', async () => {
    const outcome = await tryConnect(url, {
      clientId: 'vehicle-veh-002',
      will: {
        topic: topics.status('veh-002'),
        payload: Buffer.from('gone'),
        qos: 1,
        retain: false,
      },
      ...tlsClientOptions(pki.vehicles.get('veh-002')!),
    });
    assert.equal(outcome.connected, true, String(outcome.error));

    outcome.client.stream.destroy();

    await waitUntil(
      () => aggregatorInbox.some((m) => m.topic === topics.status('veh-002')),
      'last will at the aggregator',
    );
    await outcome.client.endAsync(true);
  });

  test('rollout id accepted for aggregator', async () => {
    const rollout = await tryConnect(url, {
      clientId: `aggregator-${FLEET_ID}-rollout`,
      ...tlsClientOptions(pki.aggregator),
    });
    assert.equal(rollout.connected, true, String(rollout.error));
    await endClient(rollout.client, 2000);

    const other = await tryConnect(url, {
      clientId: `aggregator-${FLEET_ID}-other`,
      ...tlsClientOptions(pki.aggregator),
    });
    assert.equal(other.connected, false);
    assert.equal(other.error?.code, 2);
  });

  test('client id must match certificate', async () => {
    const outcome = await tryConnect(url, {
      clientId: 'vehicle-someone-else',
      ...tlsClientOptions(pki.vehicles.get('veh-002')!),
    });

    assert.equal(outcome.connected, false);
    assert.equal(outcome.error?.code, 2);
    const line = await captured.waitFor(
      'client rejected, client id does not match identity',
      (entry) => entry.clientId === 'vehicle-someone-else',
    );
    assert.equal(line.expectedClientId, 'vehicle-veh-002');
  });

  test('taken client id rejected, holder stays', async () => {
    const holder = await connectVehicle('veh-001');
    let holderClosed = false;
    holder.on('close', () => (holderClosed = true));

    const intruder = await tryConnect(url, {
      clientId: 'vehicle-veh-001',
      username: 'intruder',
      password: PASSWORDS.intruder,
      ca: tlsClientOptions(pki.vehicles.get('veh-001')!).ca,
    });
    const impostor = await tryConnect(url, {
      clientId: 'vehicle-veh-001',
      ...tlsClientOptions(pki.vehicles.get('veh-002')!),
    });
    await delay(200);
    await holder.publishAsync(topics.status('veh-001'), 'still here', {
      qos: 1,
    });

    assert.equal(intruder.connected, false);
    assert.equal(intruder.error?.code, 2);
    assert.equal(impostor.connected, false);
    assert.equal(impostor.error?.code, 2);
    assert.equal(holderClosed, false);
    assert.equal(holder.connected, true);
    const line = await captured.waitFor(
      'client rejected, client id in use by another identity',
    );
    assert.equal(line.identity, 'urn:fleetlearn:other-fleet:vehicle:veh-001');
    assert.equal(
      line.holderIdentity,
      `urn:fleetlearn:${FLEET_ID}:vehicle:veh-001`,
    );
    await endClient(holder, 2000);
  });

  test('same identity takes over client id', async () => {
    const first = await connectVehicle('veh-002');
    const firstClosed = waitForClose(first);

    const second = await connectVehicle('veh-002');
    await firstClosed;

    assert.equal(second.connected, true);
    await captured.waitFor('client id taken over by the same identity');
    await endClient(second, 2000);
  });

  test('oversize publish dropped', async () => {
    const vehicle = await connectVehicle('veh-001');
    const closed = waitForClose(vehicle);
    const before = aggregatorInbox.length;

    vehicle.publish(topics.update('veh-001'), Buffer.alloc(8192), { qos: 1 });
    await closed;
    await delay(100);

    assert.equal(aggregatorInbox.length, before);
    const line = await captured.waitFor('publish dropped, message too large');
    assert.equal(line.bytes, 8192);
    assert.equal(line.maxMessageBytes, 4096);
    assert.equal(line.clientId, 'vehicle-veh-001');
  });

  test('too fast publishes dropped', async () => {
    const vehicle = await connectVehicle('veh-002');
    const closed = waitForClose(vehicle);
    const topic = topics.status('veh-002');
    const before = aggregatorInbox.filter((m) => m.topic === topic).length;

    for (let i = 0; i < 8; i++)
      vehicle.publish(topic, `status ${i}`, { qos: 0 });
    await closed;
    await delay(200);

    const delivered =
      aggregatorInbox.filter((m) => m.topic === topic).length - before;
    assert.equal(delivered, 5);
    const line = await captured.waitFor('publish dropped, rate limit exceeded');
    assert.equal(line.publishBurst, 5);
    assert.equal(line.publishesPerSecond, 1);
  });

  test('password vehicle connects over tls', async () => {
    const outcome = await tryConnect(url, {
      clientId: 'vehicle-veh-003',
      username: 'dev-veh-003',
      password: PASSWORDS.devVehicle,
      ca: tlsClientOptions(pki.vehicles.get('veh-001')!).ca,
    });
    assert.equal(outcome.connected, true, String(outcome.error));

    await outcome.client.publishAsync(topics.status('veh-003'), 'ok', {
      qos: 1,
    });
    const granted = await subscribeGranted(outcome.client, [
      topics.ack('veh-001'),
    ]);

    assert.deepEqual(granted, [128]);
    await waitUntil(
      () => aggregatorInbox.some((m) => m.topic === topics.status('veh-003')),
      'password vehicle status',
    );
    const line = await captured.waitFor(
      'client authenticated',
      (entry) => entry.clientId === 'vehicle-veh-003',
    );
    assert.equal(line.method, 'password');
    await endClient(outcome.client, 2000);
  });

  test('wrong password rejected', async () => {
    const outcome = await tryConnect(url, {
      clientId: 'vehicle-veh-003',
      username: 'dev-veh-003',
      password: 'not the password',
      ca: tlsClientOptions(pki.vehicles.get('veh-001')!).ca,
    });

    assert.equal(outcome.connected, false);
    assert.equal(outcome.error?.code, 4);
    await captured.waitFor('client rejected, wrong username or password');
  });

  test('no password in broker logs', () => {
    const text = captured.lines.map((line) => JSON.stringify(line)).join('\n');

    assert.ok(captured.lines.length > 20);
    assert.ok(!text.includes(PASSWORDS.devVehicle));
    assert.ok(!text.includes(PASSWORDS.intruder));
    assert.ok(!text.includes('not the password'));
  });
});

describe('password broker on tcp', () => {
  test('password identities work on tcp', async () => {
    const pki = await createTestPki(FLEET_ID, ['veh-001']);
    const usersPath = path.join(pki.dir, 'users.json');
    saveUser(
      usersPath,
      await createPasswordUser('agg', PASSWORDS.devVehicle, {
        role: 'aggregator',
        fleetId: FLEET_ID,
      }),
    );
    const captured = captureLog();
    const broker = await startBroker({ port: 0, log: captured.log, usersPath });
    const url = `mqtt://127.0.0.1:${broker.port}`;

    const good = await tryConnect(url, {
      clientId: `aggregator-${FLEET_ID}`,
      username: 'agg',
      password: PASSWORDS.devVehicle,
    });
    const anonymous = await tryConnect(url, { clientId: 'anybody' });
    const directory = PasswordDirectory.fromFile(usersPath);

    assert.equal(good.connected, true, String(good.error));
    assert.equal(anonymous.connected, false);
    assert.equal(anonymous.error?.code, 5);
    assert.deepEqual(
      await directory.authenticate('agg', Buffer.from(PASSWORDS.devVehicle)),
      { role: 'aggregator', fleetId: FLEET_ID },
    );
    assert.equal(
      await directory.authenticate('nobody', Buffer.from('whatever pw')),
      undefined,
    );
    await endClient(good.client, 2000);
    await broker.close();
    pki.remove();
  });
});

const silent = createLogger({ level: 'silent' });

describe('agent with refused credentials', () => {
  test('agent logs refusal and keeps retrying', async () => {
    const pki = await createTestPki(FLEET_ID, ['veh-001']);
    const usersPath = path.join(pki.dir, 'users.json');
    saveUser(
      usersPath,
      await createPasswordUser('dev-veh-001', PASSWORDS.devVehicle, {
        role: 'vehicle',
        vehicleId: 'veh-001',
        fleetId: FLEET_ID,
      }),
    );
    const broker = await startBroker({ port: 0, log: silent, usersPath });
    const agentLog = captureLog();
    const frames = await loadLabelledImages(resolveDataDir(), {
      split: 'train',
      limit: 10,
    });
    const agent = new VehicleAgent({
      vehicleId: 'veh-001',
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      username: 'dev-veh-001',
      password: 'not the password',
      stateDir: path.join(pki.dir, 'veh-001-state'),
      frames,
      seed: 1,
      log: agentLog.log,
    });
    try {
      await agent.start();

      const line = await agentLog.waitFor(
        'broker refused the connection, check credentials',
      );
      assert.equal(line.reasonCode, 4);
      assert.ok(!JSON.stringify(agentLog.lines).includes('not the password'));
      // It retries rather than giving up, so it stays up for a fixed key.
      await agentLog.waitFor('broker unreachable, retrying', () => true, 5000);
      assert.equal(agent.connected, false);
    } finally {
      await agent.stop();
      await broker.close();
      pki.remove();
    }
  });
});
