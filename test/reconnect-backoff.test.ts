import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, type AddressInfo } from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';
import { test } from 'node:test';
import { createLogger } from '../protocol/index.ts';
import {
  createBrokerClient,
  reconnectDelayMs,
} from '../vehicle-agent/connection.ts';

const log = createLogger({ level: 'silent' });

test('backoff doubles within jitter bounds', () => {
  const cases = [
    { attempt: 0, low: 500, high: 1000 },
    { attempt: 1, low: 1000, high: 2000 },
    { attempt: 3, low: 4000, high: 8000 },
    { attempt: 10, low: 15_000, high: 30_000 },
  ];
  for (const { attempt, low, high } of cases) {
    assert.equal(
      reconnectDelayMs(attempt, () => 0),
      low,
    );
    assert.equal(
      reconnectDelayMs(attempt, () => 0.999999),
      high,
    );
  }
});

test('agent client backs off between attempts', async () => {
  // A server that drops every connection, like a broker that is down.
  const attemptTimes: number[] = [];
  const server = createServer((socket) => {
    attemptTimes.push(Date.now());
    socket.destroy();
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  const client = createBrokerClient({
    brokerUrl: `mqtt://127.0.0.1:${port}`,
    clientId: 'vehicle-backoff',
    will: {
      topic: 'fleet/v1/test/vehicles/backoff/status',
      payload: new Uint8Array(0),
    },
    log,
    onConnect: () => undefined,
  });
  try {
    const deadline = Date.now() + 20_000;
    while (attemptTimes.length < 4 && Date.now() < deadline) await delay(100);

    assert.ok(attemptTimes.length >= 4, `${attemptTimes.length} attempts`);
    const gaps = attemptTimes.slice(1).map((time, i) => time - attemptTimes[i]);
    // The gap after attempt k (from 0) is 2^(k-1) to 2^k seconds.
    assert.ok(gaps[0] >= 400, `first gap ${gaps[0]} ms`);
    assert.ok(gaps[0] <= 1500, `first gap ${gaps[0]} ms`);
    assert.ok(gaps[2] >= 1900, `third gap ${gaps[2]} ms`);
    assert.ok(gaps[2] <= 5000, `third gap ${gaps[2]} ms`);
    assert.ok(gaps[2] > gaps[0]);
  } finally {
    await client.endAsync(true);
    server.close();
  }
});
