import assert from 'node:assert/strict';
import { once } from 'node:events';
import { before, describe, test } from 'node:test';
import {
  Aggregator,
  resolveOptions,
  type AggregatorOptions,
  type RoundClosedEvent,
  type RoundFailedEvent,
} from '../aggregator/index.ts';
import {
  AckStatus,
  ErrorCode,
  FleetError,
  encodeModelUpdate,
} from '../protocol/index.ts';
import { importOnnxWeights } from '../models/index.ts';
import {
  TestVehicle,
  buildUpdate,
  createWorkspace,
  fetchRetainedRelease,
  loadRealImages,
  startTestBroker,
  testOptions,
  type RealImages,
} from './aggregator-fixtures.ts';

const HONEST_DELTA = 0.01;
/** Honest vehicles send HONEST_DELTA times these; the last one attacks. */
const SCALES = [1, 1.1, 0.9, 1.05, 500];

let images: RealImages;

before(async () => {
  images = await loadRealImages();
});

interface RoundOutcome {
  /** Released dense2/bias minus the base, or undefined for a failed round. */
  biasShift?: Float32Array;
  failed?: RoundFailedEvent;
  modelVersion: number;
}

/**
 * Runs one round on a fresh broker and state: vehicle k sends the
 * constant delta HONEST_DELTA x scales[k] with 10 examples.
 */
async function runRound(
  scales: readonly number[],
  overrides: Partial<AggregatorOptions>,
): Promise<RoundOutcome> {
  const broker = await startTestBroker();
  const workspace = createWorkspace();
  const ids = scales.map((_, k) => `veh-${k}`);
  const vehicles = await Promise.all(
    ids.map((id) => TestVehicle.connect(broker, id)),
  );
  const aggregator = new Aggregator(
    testOptions(broker, workspace, images, {
      minVehiclesOnline: scales.length,
      minUpdates: scales.length,
      ...overrides,
    }),
  );
  try {
    const closed = once(aggregator, 'round-closed');
    const failed = once(aggregator, 'round-failed');
    await aggregator.start();
    const task = await vehicles[0].nextTask();
    const acks = await Promise.all(
      vehicles.map((vehicle, k) => {
        const update = buildUpdate(vehicle.id, task, {
          value: () => HONEST_DELTA * scales[k],
        });
        return vehicle.send(encodeModelUpdate(update));
      }),
    );
    for (const ack of acks) assert.equal(ack.status, AckStatus.Accepted);

    const outcome = await Promise.race([
      closed.then(([event]) => ({ closed: event as RoundClosedEvent })),
      failed.then(([event]) => ({ failed: event as RoundFailedEvent })),
    ]);
    const modelVersion = aggregator.currentModelVersion;
    if ('failed' in outcome) return { failed: outcome.failed, modelVersion };

    const release = await fetchRetainedRelease(broker);
    const released = importOnnxWeights(release.onnx).get('dense2/bias')!;
    const base = workspace.baseWeights.get('dense2/bias')!;
    const biasShift = released.map((value, i) => value - base[i]);
    return { biasShift, modelVersion };
  } finally {
    await aggregator.stop();
    await Promise.all(vehicles.map((vehicle) => vehicle.close()));
    await broker.close();
    workspace.remove();
  }
}

function maxDistance(values: Float32Array, target: number): number {
  return Math.max(...values.map((value) => Math.abs(value - target)));
}

describe('robust aggregation in rounds', () => {
  test('median ignores boosted update', async () => {
    const { biasShift } = await runRound(SCALES, { aggregation: 'median' });
    // Median of the five is the honest 1.05 x HONEST_DELTA.
    assert.ok(maxDistance(biasShift!, 1.05 * HONEST_DELTA) < 1e-5);
  });

  test('trimmed mean ignores boosted update', async () => {
    const { biasShift } = await runRound(SCALES, {
      aggregation: 'trimmed-mean',
      trimFraction: 0.2,
    });
    // floor(0.2 x 5) = 1 dropped at each end: mean of 1, 1.05 and 1.1.
    assert.ok(maxDistance(biasShift!, 1.05 * HONEST_DELTA) < 1e-5);
  });

  test('fedavg follows boosted update', async () => {
    const { biasShift } = await runRound(SCALES, {});
    const mean = (HONEST_DELTA * SCALES.reduce((a, b) => a + b, 0)) / 5;
    assert.ok(mean > 1);
    assert.ok(maxDistance(biasShift!, mean) < 1e-4);
  });

  test('krum requirement failure fails round', async () => {
    const outcome = await runRound([1, 1.1, 0.9], {
      aggregation: 'krum',
      byzantineCount: 1,
    });
    assert.equal(outcome.failed?.reasonCode, ErrorCode.RobustRuleUnsatisfied);
    assert.match(outcome.failed!.message, /n > 2f \+ 2/);
    assert.equal(outcome.failed!.modelVersion, 0);
    assert.equal(outcome.modelVersion, 0);
  });
});

describe('robust aggregation options', () => {
  const base = {
    fleetId: 'f',
    brokerUrl: 'mqtt://127.0.0.1:1',
    stateDir: '/tmp/unused',
    baseWeightsPath: '/tmp/unused.pb',
  };

  test('defaults keep fedavg', () => {
    const resolved = resolveOptions(base);
    assert.equal(resolved.aggregation, 'fedavg');
    assert.equal(resolved.byzantineCount, 0);
    assert.equal(resolved.trimFraction, 0.2);
    assert.equal(resolved.multiKrumSelect, 0);
  });

  test('bad robust settings rejected', () => {
    const bad: Partial<AggregatorOptions>[] = [
      { aggregation: 'mean' as never },
      { byzantineCount: -1 },
      { trimFraction: 0.5 },
      { multiKrumSelect: 1.5 },
    ];
    for (const override of bad) {
      assert.throws(
        () => resolveOptions({ ...base, ...override }),
        (err: unknown) =>
          err instanceof FleetError && err.code === ErrorCode.InvalidConfig,
      );
    }
  });
});
