import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { startBroker, type RunningBroker } from '../broker/index.ts';
import { createLogger } from '../protocol/index.ts';
import type { Packet } from 'mqtt-packet';
import {
  FaultyLink,
  type PacketDirection,
  type PacketInterceptor,
  type PacketVerdict,
} from '../scripts/sim/faulty-link.ts';

const log = createLogger({ level: 'silent' });
let broker: RunningBroker;
const clients: MqttClient[] = [];
const links: FaultyLink[] = [];

before(async () => {
  broker = await startBroker({ port: 0, log });
});

afterEach(async () => {
  for (const client of clients.splice(0)) await client.endAsync(true);
  for (const link of links.splice(0)) await link.close();
});

after(async () => {
  await broker.close();
});

async function startLink(intercept?: PacketInterceptor): Promise<FaultyLink> {
  const link = new FaultyLink({
    name: 'test',
    brokerPort: broker.port,
    intercept,
    log,
  });
  await link.start();
  links.push(link);
  return link;
}

async function connect(
  url: string,
  options: IClientOptions = {},
): Promise<MqttClient> {
  const client = await mqtt.connectAsync(url, {
    protocolVersion: 4,
    reconnectPeriod: 100,
    ...options,
  });
  client.on('error', () => undefined);
  clients.push(client);
  return client;
}

/** Connects a client straight to the broker that records what arrives on `topic`. */
async function subscriber(topic: string): Promise<Buffer[]> {
  const client = await connect(`mqtt://127.0.0.1:${broker.port}`);
  const received: Buffer[] = [];
  client.on('message', (_topic, payload) => received.push(payload));
  await client.subscribeAsync(topic, { qos: 1 });
  return received;
}

async function waitFor(isDone: () => boolean, timeoutMs = 3000) {
  const deadline = Date.now() + timeoutMs;
  while (!isDone()) {
    assert.ok(Date.now() < deadline, 'condition not met in time');
    await delay(20);
  }
}

describe('FaultyLink', () => {
  test('forwards publish and puback', async () => {
    const received = await subscriber('link/forward');
    const link = await startLink();
    const client = await connect(link.url);

    await client.publishAsync('link/forward', 'hello', { qos: 1 });
    await waitFor(() => received.length === 1);

    assert.equal(received[0].toString(), 'hello');
    assert.equal(link.connectionCount, 1);
  });

  test('duplicate verdict delivers twice', async () => {
    const received = await subscriber('link/twice');
    const link = await startLink((packet, direction) =>
      direction === 'to-broker' && packet.cmd === 'publish'
        ? 'duplicate'
        : 'forward',
    );
    const client = await connect(link.url);

    await client.publishAsync('link/twice', 'once', { qos: 1 });
    await waitFor(() => received.length === 2);

    assert.deepEqual(
      received.map((payload) => payload.toString()),
      ['once', 'once'],
    );
  });

  test('dropped puback makes client resend', async () => {
    const received = await subscriber('link/resend');
    let pubacksDropped = 0;
    const link = await startLink((packet, direction) => {
      if (direction !== 'to-client' || packet.cmd !== 'puback')
        return 'forward';
      pubacksDropped += 1;
      return pubacksDropped === 1 ? 'drop' : 'forward';
    });
    const client = await connect(link.url, {
      clientId: 'link-resend',
      clean: false,
    });

    const published = client.publishAsync('link/resend', 'again', { qos: 1 });
    await waitFor(() => pubacksDropped === 1);
    link.cut();
    await published;
    await waitFor(() => received.length === 2);

    assert.deepEqual(
      received.map((payload) => payload.toString()),
      ['again', 'again'],
    );
    assert.equal(link.connectionCount, 2);
  });

  test('cut mid publish fires last will', async () => {
    const wills = await subscriber('link/will');
    const received = await subscriber('link/data');
    let cuts = 0;
    const link = await startLink((packet, direction) => {
      const isData =
        direction === 'to-broker' &&
        packet.cmd === 'publish' &&
        packet.topic === 'link/data';
      if (!isData || cuts > 0) return 'forward';
      cuts += 1;
      return { cutAfterBytes: 10 };
    });
    const client = await connect(link.url, {
      clientId: 'link-cut',
      clean: false,
      will: { topic: 'link/will', payload: Buffer.from('gone'), qos: 1 },
    });

    await client.publishAsync('link/data', Buffer.alloc(1000, 7), { qos: 1 });
    await waitFor(() => received.length === 1 && wills.length === 1);

    assert.equal(wills[0].toString(), 'gone');
    assert.equal(received[0].length, 1000);
    assert.equal(link.connectionCount, 2);
  });

  test('blocked link refuses connections', async () => {
    const link = await startLink();
    link.setBlocked(true);

    const refused = mqtt.connect(link.url, {
      protocolVersion: 4,
      reconnectPeriod: 0,
    });
    refused.on('error', () => undefined);
    await new Promise<void>((resolve) =>
      refused.once('close', () => resolve()),
    );
    const wasConnected = refused.connected;
    await refused.endAsync(true);
    link.setBlocked(false);
    const client = await connect(link.url);

    assert.equal(wasConnected, false);
    assert.equal(client.connected, true);
  });

  test('held packet delays later ones', async () => {
    const received = await subscriber('link/order');
    let isFirst = true;
    const hold = async (
      packet: Packet,
      direction: PacketDirection,
    ): Promise<PacketVerdict> => {
      if (direction !== 'to-broker' || packet.cmd !== 'publish') {
        return 'forward';
      }
      if (isFirst) {
        isFirst = false;
        await delay(300);
      }
      return 'forward';
    };
    const link = await startLink(hold);
    const client = await connect(link.url);
    const started = Date.now();

    const first = client.publishAsync('link/order', 'first', { qos: 1 });
    const second = client.publishAsync('link/order', 'second', { qos: 1 });
    await delay(100);
    const heldDuringHold = link.heldPackets;
    await Promise.all([first, second]);
    await waitFor(() => received.length === 2);

    assert.ok(heldDuringHold >= 2, `held ${heldDuringHold}`);
    assert.ok(Date.now() - started >= 300);
    assert.deepEqual(
      received.map((payload) => payload.toString()),
      ['first', 'second'],
    );
    assert.equal(link.heldPackets, 0);
  });

  test('rejects a bad broker port', () => {
    assert.throws(
      () => new FaultyLink({ name: 'bad', brokerPort: 0, log }),
      RangeError,
    );
  });
});
