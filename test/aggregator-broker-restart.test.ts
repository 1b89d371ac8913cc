import assert from 'node:assert/strict';
import { once } from 'node:events';
import { setTimeout as delay } from 'node:timers/promises';
import { test } from 'node:test';
import mqtt from 'mqtt';
import { Aggregator } from '../aggregator/index.ts';
import { startBroker, type RunningBroker } from '../broker/index.ts';
import { decodeRoundTask } from '../protocol/index.ts';
import {
  TestVehicle,
  createWorkspace,
  fetchRetainedRelease,
  loadRealImages,
  quietLog,
  testOptions,
  topics,
} from './aggregator-fixtures.ts';
import { endClient } from '../protocol/mqtt-end.ts';

/** Returns the retained round task a fresh subscriber gets, if any. */
async function retainedRound(port: number): Promise<number | undefined> {
  const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
    protocolVersion: 4,
  });
  try {
    let round: number | undefined;
    client.on('message', (_topic, payload, packet) => {
      if (packet.retain && payload.length > 0) {
        round = decodeRoundTask(payload).round;
      }
    });
    await client.subscribeAsync(topics.roundTask(), { qos: 1 });
    await delay(500);
    return round;
  } finally {
    await endClient(client, 2000);
  }
}

test('broker restart republishes retained state', async () => {
  const images = await loadRealImages();
  let broker: RunningBroker = await startBroker({ port: 0, log: quietLog });
  const port = broker.port;
  const workspace = createWorkspace();
  const vehicle = await TestVehicle.connect(broker, 'veh-a');
  const aggregator = new Aggregator(
    testOptions(broker, workspace, images, {
      minVehiclesOnline: 1,
      roundTimeoutMs: 60_000,
    }),
  );
  try {
    const opened = once(aggregator, 'round-opened');
    await aggregator.start();
    await opened;
    await vehicle.nextTask();
    assert.equal(await retainedRound(port), 1);

    // A broker without persistence loses retained messages on restart.
    await vehicle.close();
    await broker.close();
    broker = await startBroker({ port, log: quietLog });
    assert.equal(await retainedRound(port), undefined);

    // The aggregator reconnects (it retries every second) and publishes
    // the release and the open round's task again.
    let round: number | undefined;
    for (let attempt = 0; attempt < 20 && round === undefined; attempt++) {
      round = await retainedRound(port);
    }
    assert.equal(round, 1);
    const release = await fetchRetainedRelease(broker);
    assert.equal(release.version, 0);
    assert.equal(release.onnx.byteLength, release.sizeBytes);
  } finally {
    await aggregator.stop();
    await broker.close();
    workspace.remove();
  }
});
