import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, type AddressInfo } from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';
import { test } from 'node:test';
import mqtt from 'mqtt';
import { startBroker } from '../broker/index.ts';
import { createLogger } from '../protocol/index.ts';
import { awaitConnect, endClient } from '../protocol/mqtt-end.ts';
import { FaultyLink } from '../scripts/sim/faulty-link.ts';

const log = createLogger({ level: 'silent' });

test('end bounded with publish in flight', async () => {
  const broker = await startBroker({ port: 0, log });
  // The link never delivers the broker's PUBACK, so the publish stays in
  // flight, and then the link goes down for good.
  const link = new FaultyLink({
    name: 'end-test',
    brokerPort: broker.port,
    log,
    intercept: (packet, direction) =>
      direction === 'to-client' && packet.cmd === 'puback' ? 'drop' : 'forward',
  });
  await link.start();
  const client = await mqtt.connectAsync(link.url, {
    protocolVersion: 4,
    clientId: 'end-test',
    clean: false,
    reconnectPeriod: 200,
  });
  client.on('error', () => undefined);
  try {
    void client
      .publishAsync('end/test', 'x', { qos: 1 })
      .catch(() => undefined);
    await delay(200);
    link.setBlocked(true);
    link.cut();
    await delay(50);

    const started = Date.now();
    await endClient(client, 1000);
    const elapsedMs = Date.now() - started;

    assert.ok(elapsedMs < 5000, `endClient took ${elapsedMs} ms`);
    assert.equal(client.connected, false);
  } finally {
    await client.endAsync(true).catch(() => undefined);
    await link.close();
    await broker.close();
  }
});

/** Returns a 127.0.0.1 port that nothing listens on, so connects fail. */
async function closedPort(): Promise<number> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

test('connect wait resolves on connect', async () => {
  const broker = await startBroker({ port: 0, log });
  const url = `mqtt://127.0.0.1:${broker.port}`;
  const client = mqtt.connect(url, { protocolVersion: 4 });
  try {
    await awaitConnect(client, url, new AbortController().signal);

    assert.equal(client.connected, true);
  } finally {
    await client.endAsync(true);
    await broker.close();
  }
});

test('connect wait abort ends client', async () => {
  const url = `mqtt://127.0.0.1:${await closedPort()}`;
  const client = mqtt.connect(url, {
    protocolVersion: 4,
    reconnectPeriod: 50,
  });
  client.on('error', () => undefined);
  try {
    await assert.rejects(
      awaitConnect(client, url, AbortSignal.timeout(300)),
      new Error(`connection to ${url} aborted before it was up`),
    );

    assert.equal(client.disconnected, true);
  } finally {
    await client.endAsync(true);
  }
});

test('connect wait rejects aborted signal', async () => {
  const url = `mqtt://127.0.0.1:${await closedPort()}`;
  const client = mqtt.connect(url, { protocolVersion: 4 });
  client.on('error', () => undefined);
  try {
    await assert.rejects(
      awaitConnect(client, url, AbortSignal.abort()),
      /aborted before it was up/,
    );

    assert.equal(client.disconnected, true);
  } finally {
    await client.endAsync(true);
  }
});
