import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import {
  Aggregator,
  type RoundClosedEvent,
  type UpdateDecidedEvent,
} from '../aggregator/index.ts';
import type { RunningBroker } from '../broker/index.ts';
import { MODEL_NAME, TENSOR_SPECS } from '../models/architecture.ts';
import {
  loadLabelledImages,
  resolveDataDir,
  subset,
  type LabelledImages,
} from '../models/index.ts';
import {
  CompressionKind,
  compressionOfTask,
  encodeDeltaTensor,
  type UpdateCompression,
} from '../protocol/compression/index.ts';
import {
  AckStatus,
  ErrorCode,
  encodeModelUpdate,
  type ModelUpdate,
  type RoundTask,
} from '../protocol/index.ts';
import { VehicleAgent } from '../vehicle-agent/index.ts';
import {
  FLEET_ID,
  TestVehicle,
  loadRealImages,
  quietLog,
  startTestBroker,
} from './aggregator-fixtures.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));
const BASE_WEIGHTS = path.join(
  REPOSITORY_ROOT,
  'models/base/gtsrb-cnn-v0.weights.pb',
);
const TRAINABLE = TENSOR_SPECS.filter((spec) => spec.name.startsWith('dense'));
/** Bytes of the trained tensors as float32, without message overhead. */
const FLOAT32_BYTES = TRAINABLE.reduce(
  (sum, spec) => sum + spec.shape.reduce((a, b) => a * b, 4),
  0,
);
const INT8: UpdateCompression = { kind: CompressionKind.Int8, topkDensity: 0 };
const TOPK: UpdateCompression = {
  kind: CompressionKind.TopK,
  topkDensity: 0.01,
};
const FLOAT32: UpdateCompression = {
  kind: CompressionKind.Float32,
  topkDensity: 0,
};

/** Builds an update of the test vehicle with small deltas in `compression`. */
function scriptedUpdate(
  task: RoundTask,
  updateId: string,
  compression: UpdateCompression,
): Uint8Array {
  const deltas = TRAINABLE.map((spec) => {
    const count = spec.shape.reduce((a, b) => a * b, 1);
    const values = Float32Array.from(
      { length: count },
      (_, i) => ((i % 11) - 5) * 1e-4,
    );
    return encodeDeltaTensor(spec.name, spec.shape, values, compression);
  });
  const update: ModelUpdate = {
    updateId,
    vehicleId: 'veh-t',
    modelName: MODEL_NAME,
    baseModelVersion: task.modelVersion,
    round: task.round,
    numExamples: 10,
    deltas,
    metrics: {
      trainLoss: 1,
      trainAccuracy: 0,
      trainDurationMs: 1,
      backend: 'test',
    },
    createdAtMs: Date.now(),
  };
  return encodeModelUpdate(update);
}

async function taskOfRound(
  vehicle: TestVehicle,
  round: number,
): Promise<RoundTask> {
  for (;;) {
    const task = await vehicle.nextTask(30_000);
    if (task.round === round) return task;
  }
}

describe('compressed rounds end to end', () => {
  let workDir: string;
  let broker: RunningBroker;
  let frames: LabelledImages;

  before(async () => {
    workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-compression-'));
    broker = await startTestBroker();
    frames = await loadLabelledImages(resolveDataDir(), {
      split: 'train',
      limit: 240,
    });
  });

  after(async () => {
    await broker?.close();
    rmSync(workDir, { recursive: true, force: true });
  });

  test('int8 round then topk round', async () => {
    const images = await loadRealImages();
    const brokerUrl = `mqtt://127.0.0.1:${broker.port}`;
    const agents = ['veh-a', 'veh-b'].map(
      (vehicleId, index) =>
        new VehicleAgent({
          vehicleId,
          fleetId: FLEET_ID,
          brokerUrl,
          stateDir: path.join(workDir, vehicleId),
          frames: subset(
            frames,
            Array.from({ length: 120 }, (_, i) => index * 120 + i),
          ),
          log: quietLog,
        }),
    );
    const scripted = await TestVehicle.connect(broker, 'veh-t');
    const decided: UpdateDecidedEvent[] = [];
    const closed: RoundClosedEvent[] = [];
    const aggregatorFor = (compression: UpdateCompression): Aggregator => {
      const aggregator = new Aggregator({
        fleetId: FLEET_ID,
        brokerUrl,
        stateDir: path.join(workDir, 'aggregator'),
        baseWeightsPath: BASE_WEIGHTS,
        minVehiclesOnline: 3,
        minUpdates: 3,
        maxRounds: 1,
        roundTimeoutMs: 60_000,
        onlineWaitTimeoutMs: 30_000,
        probeImages: images.probeImages,
        probeCount: images.probeCount,
        updateCompression: compression,
        log: quietLog,
      });
      aggregator.on('update-decided', (event) => decided.push(event));
      aggregator.on('round-closed', (event) => closed.push(event));
      return aggregator;
    };

    const int8Aggregator = aggregatorFor(INT8);
    let topkAggregator: Aggregator | undefined;
    try {
      await Promise.all(agents.map((agent) => agent.start()));
      await int8Aggregator.start();
      const int8Task = await taskOfRound(scripted, 1);
      assert.deepEqual(compressionOfTask(int8Task), INT8);
      const wrong = await scripted.send(
        scriptedUpdate(int8Task, 't-float32', FLOAT32),
      );
      const right = await scripted.send(
        scriptedUpdate(int8Task, 't-int8', INT8),
      );
      await int8Aggregator.whenFinished();
      await int8Aggregator.stop();

      assert.equal(wrong.status, AckStatus.Rejected);
      assert.equal(wrong.reasonCode, ErrorCode.UnsupportedEncoding);
      assert.match(wrong.reason, /expects encoding 3 \(int8\)/);
      assert.equal(right.status, AckStatus.Accepted);

      topkAggregator = aggregatorFor(TOPK);
      await topkAggregator.start();
      const topkTask = await taskOfRound(scripted, 2);
      assert.equal(compressionOfTask(topkTask).kind, CompressionKind.TopK);
      const sparse = await scripted.send(
        scriptedUpdate(topkTask, 't-topk', TOPK),
      );
      await topkAggregator.whenFinished();

      assert.equal(sparse.status, AckStatus.Accepted);
    } finally {
      await topkAggregator?.stop();
      await int8Aggregator.stop();
      await Promise.all(agents.map((agent) => agent.stop()));
      await scripted.close();
    }

    assert.deepEqual(
      closed.map((event) => [event.round, event.accepted, event.modelVersion]),
      [
        [1, 3, 1],
        [2, 3, 2],
      ],
    );
    const agentBytes = (round: number): number[] =>
      decided
        .filter(
          (e) => e.accepted && e.round === round && e.vehicleId !== 'veh-t',
        )
        .map((e) => e.bytes);
    const int8Bytes = agentBytes(1);
    const topkBytes = agentBytes(2);
    assert.equal(int8Bytes.length, 2);
    assert.equal(topkBytes.length, 2);
    for (const bytes of int8Bytes) {
      assert.ok(bytes <= 0.26 * FLOAT32_BYTES, `int8 update of ${bytes} bytes`);
    }
    for (const bytes of topkBytes) {
      assert.ok(bytes <= 0.03 * FLOAT32_BYTES, `topk update of ${bytes} bytes`);
    }
  });
});
