import assert from 'node:assert/strict';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, test } from 'node:test';
import { Aggregator, type RoundOpenedEvent } from '../aggregator/index.ts';
import { MODEL_NAME, createRandom } from '../models/index.ts';
import { AckStatus, encodeModelUpdate } from '../protocol/index.ts';
import {
  TestVehicle,
  buildUpdate,
  createWorkspace,
  loadRealImages,
  startTestBroker,
  testOptions,
  type RealImages,
} from './aggregator-fixtures.ts';

const VEHICLE_IDS = ['veh-a', 'veh-b', 'veh-c', 'veh-d', 'veh-e'];

let images: RealImages;

before(async () => {
  images = await loadRealImages();
});

/**
 * Vehicles 0 and 1 send large deltas that cancel, the others small random
 * ones. With a plain floating-point sum the small deltas are lost or kept
 * depending on whether they arrive between the two large ones.
 */
function planOf(index: number): {
  numExamples: number;
  value: (name: string, i: number) => number;
} {
  if (index < 2) {
    const sign = index === 0 ? 1 : -1;
    return {
      numExamples: 1_000_000,
      value: (_name, i) => sign * (999 - (i % 7)),
    };
  }
  const random = createRandom(100 + index);
  return {
    numExamples: 7 + 13 * index,
    value: () => (random() - 0.5) * 10 ** Math.floor(random() * 5 - 5),
  };
}

/**
 * Runs one round in which the vehicles send their updates one at a time,
 * in `order`, and returns the new version's weights file and ONNX file.
 */
async function runRound(
  order: number[],
): Promise<{ weights: Buffer; onnx: Buffer }> {
  const broker = await startTestBroker();
  const workspace = createWorkspace();
  const vehicles = await Promise.all(
    VEHICLE_IDS.map((id) => TestVehicle.connect(broker, id)),
  );
  const options = testOptions(broker, workspace, images, {
    minVehiclesOnline: VEHICLE_IDS.length,
    minUpdates: VEHICLE_IDS.length,
  });
  const aggregator = new Aggregator(options);
  try {
    const opened = once(aggregator, 'round-opened');
    const closed = once(aggregator, 'round-closed');
    await aggregator.start();
    const [event] = (await opened) as [RoundOpenedEvent];
    assert.equal(event.selected.length, VEHICLE_IDS.length);
    const task = await vehicles[0].nextTask();

    for (const index of order) {
      const update = buildUpdate(VEHICLE_IDS[index], task, planOf(index));
      const ack = await vehicles[index].send(encodeModelUpdate(update));
      assert.equal(ack.status, AckStatus.Accepted, ack.reason);
    }
    await closed;

    const dir = join(options.stateDir, 'models', MODEL_NAME);
    return {
      weights: readFileSync(join(dir, 'v1.weights.pb')),
      onnx: readFileSync(join(dir, 'v1.onnx')),
    };
  } finally {
    await aggregator.stop();
    await Promise.all(vehicles.map((vehicle) => vehicle.close()));
    await broker.close();
    workspace.remove();
  }
}

test('arrival order gives identical model', async () => {
  const forward = await runRound([0, 1, 2, 3, 4]);
  const shuffled = await runRound([3, 0, 4, 2, 1]);

  assert.ok(forward.weights.equals(shuffled.weights));
  assert.ok(forward.onnx.equals(shuffled.onnx));
});
