import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { test } from 'node:test';
import mqtt from 'mqtt';
import { startBroker } from '../broker/index.ts';
import { loadLabelledImages, resolveDataDir } from '../models/index.ts';
import {
  AckStatus,
  ErrorCode,
  FleetTopics,
  VehicleState,
  createLogger,
  decodeVehicleStatus,
  encodeUpdateAck,
  type VehicleStatus,
} from '../protocol/index.ts';
import { FaultyLink } from '../scripts/sim/faulty-link.ts';
import { VehicleAgent } from '../vehicle-agent/index.ts';
import { endClient } from '../protocol/mqtt-end.ts';

const log = createLogger({ level: process.env.TEST_LOG_LEVEL ?? 'silent' });
const topics = new FleetTopics('resync');

test('resync cut by disconnect keeps subscriptions', async () => {
  const broker = await startBroker({ port: 0, log });
  let failNextSubscribe = false;
  // Drops the agent's next SUBSCRIBE and cuts the link, as a tunnel would
  // in the middle of a resynchronisation.
  const link: FaultyLink = new FaultyLink({
    name: 'veh-001',
    brokerPort: broker.port,
    log,
    intercept: (packet, direction) => {
      if (
        direction === 'to-broker' &&
        packet.cmd === 'subscribe' &&
        failNextSubscribe
      ) {
        failNextSubscribe = false;
        setImmediate(() => link.cut());
        return 'drop';
      }
      return 'forward';
    },
  });
  await link.start();
  const stateDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-resync-'));
  const frames = await loadLabelledImages(resolveDataDir(), {
    split: 'train',
    limit: 20,
  });
  const agent = new VehicleAgent({
    vehicleId: 'veh-001',
    fleetId: 'resync',
    brokerUrl: link.url,
    stateDir,
    frames,
    seed: 1,
    log,
  });
  const operator = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, {
    protocolVersion: 4,
  });
  // Bytes the agent receives after a probe on the round topic.
  const probeRoundTopic = async (): Promise<number> => {
    const before = agent.counters.bytesReceived;
    await operator.publishAsync(topics.roundTask(), Buffer.from('probe'), {
      qos: 1,
    });
    await delay(500);
    return agent.counters.bytesReceived - before;
  };
  try {
    let connected = once(agent, 'connected');
    await agent.start();
    await connected;
    assert.equal(await probeRoundTopic(), 5);

    // A stale-round ack makes the agent resynchronise.
    failNextSubscribe = true;
    connected = once(agent, 'connected');
    const ack = encodeUpdateAck({
      updateId: 'unknown-update',
      round: 1,
      status: AckStatus.Rejected,
      reasonCode: ErrorCode.WrongRound,
      reason: 'round 1 is over',
      currentRound: 2,
      currentModelVersion: 0,
    });
    await operator.publishAsync(topics.ack('veh-001'), Buffer.from(ack), {
      qos: 1,
    });
    await connected;

    assert.equal(failNextSubscribe, false);
    assert.ok(agent.connected);
    assert.ok((await probeRoundTopic()) >= 5);
  } finally {
    await endClient(operator, 2000);
    await agent.stop();
    await link.close();
    await broker.close();
    rmSync(stateDir, { recursive: true, force: true });
  }
});

test('last will carries connection id', async () => {
  const broker = await startBroker({ port: 0, log });
  const link = new FaultyLink({
    name: 'veh-002',
    brokerPort: broker.port,
    log,
  });
  await link.start();
  const stateDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-will-'));
  const frames = await loadLabelledImages(resolveDataDir(), {
    split: 'train',
    limit: 20,
  });
  const agent = new VehicleAgent({
    vehicleId: 'veh-002',
    fleetId: 'resync',
    brokerUrl: link.url,
    stateDir,
    frames,
    seed: 1,
    log,
  });
  const observer = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, {
    protocolVersion: 4,
  });
  const statuses: VehicleStatus[] = [];
  observer.on('message', (_topic, payload) => {
    if (payload.length > 0) statuses.push(decodeVehicleStatus(payload));
  });
  await observer.subscribeAsync(topics.status('veh-002'), { qos: 1 });
  try {
    let connected = once(agent, 'connected');
    await agent.start();
    await connected;
    for (let cut = 0; cut < 2; cut++) {
      connected = once(agent, 'connected');
      link.cut();
      await connected;
    }
    await delay(300);

    // ONLINE, then per cut the will of the closed connection and the
    // ONLINE status of the next one, each connection with a higher id.
    const states = statuses.map((status) => status.state);
    assert.deepEqual(states, [
      VehicleState.Online,
      VehicleState.Offline,
      VehicleState.Online,
      VehicleState.Offline,
      VehicleState.Online,
    ]);
    const ids = statuses.map((status) => status.connectionId);
    assert.equal(ids[1], ids[0]);
    assert.ok(ids[2] > ids[1]);
    assert.equal(ids[3], ids[2]);
    assert.ok(ids[4] > ids[3]);
  } finally {
    await endClient(observer, 2000);
    await agent.stop();
    await link.close();
    await broker.close();
    rmSync(stateDir, { recursive: true, force: true });
  }
});
