import assert from 'node:assert/strict';
import { once } from 'node:events';
import { Writable } from 'node:stream';
import { before, describe, test } from 'node:test';
import { pino } from 'pino';
import {
  Aggregator,
  ModelStore,
  normBoundOfFlags,
  resolveOptions,
  type AggregatorOptions,
  type NormBoundOptions,
  type RoundClosedEvent,
  type RoundFailedEvent,
} from '../aggregator/index.ts';
import { MODEL_NAME, tensorNamesOfLayers } from '../models/architecture.ts';
import {
  AckStatus,
  ErrorCode,
  FleetError,
  countElements,
  encodeModelUpdate,
} from '../protocol/index.ts';
import { TENSOR_SPECS } from '../models/architecture.ts';
import {
  TestVehicle,
  buildUpdate,
  createWorkspace,
  loadRealImages,
  startTestBroker,
  testOptions,
  type RealImages,
} from './aggregator-fixtures.ts';

const HONEST_DELTA = 0.01;
/** Vehicle k sends HONEST_DELTA x SCALES[k] everywhere; the last attacks. */
const SCALES = [1, 1.1, 0.9, 500];
const EXAMPLES = [10, 20, 30, 40];
const MEDIAN_FACTOR = 3;
/** Values in the default trainable tensors, dense1 and dense2. */
const TRAINABLE_VALUES = tensorNamesOfLayers(['dense1', 'dense2'])
  .map((name) =>
    countElements(TENSOR_SPECS.find((s) => s.name === name)!.shape),
  )
  .reduce((a, b) => a + b, 0);

let images: RealImages;

before(async () => {
  images = await loadRealImages();
});

function isFleetError(code: string, pattern?: RegExp) {
  return (err: unknown): boolean =>
    err instanceof FleetError &&
    err.code === code &&
    (pattern === undefined || pattern.test(err.message));
}

/** Norm of a constant delta c over the trainable tensors. */
function normOf(value: number): number {
  return Math.abs(value) * Math.sqrt(TRAINABLE_VALUES);
}

/** FedAvg of constant deltas, weighted by numExamples. */
function weightedMean(values: number[], examples: number[]): number {
  let sum = 0;
  let total = 0;
  values.forEach((value, k) => {
    sum += value * examples[k];
    total += examples[k];
  });
  return sum / total;
}

/** Log lines as parsed objects, from a pino logger writing into memory. */
function captureLog() {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString().split('\n')) {
        if (line.trim() !== '') lines.push(JSON.parse(line));
      }
      done();
    },
  });
  return { log: pino({ level: 'warn' }, stream), lines };
}

interface RoundOutcome {
  closed?: RoundClosedEvent;
  failed?: RoundFailedEvent;
  /** Released dense1/kernel and dense2/bias minus the base. */
  shifts?: Float32Array[];
  lines: Array<Record<string, unknown>>;
}

/** Runs one round on a fresh broker and state; vehicle k sends SCALES[k]. */
async function runRound(
  overrides: Partial<AggregatorOptions>,
): Promise<RoundOutcome> {
  const broker = await startTestBroker();
  const workspace = createWorkspace();
  const { log, lines } = captureLog();
  const vehicles = await Promise.all(
    SCALES.map((_, k) => TestVehicle.connect(broker, `veh-${k}`)),
  );
  const options = testOptions(broker, workspace, images, {
    minVehiclesOnline: SCALES.length,
    minUpdates: 3,
    log,
    ...overrides,
  });
  const aggregator = new Aggregator(options);
  try {
    const closed = once(aggregator, 'round-closed');
    const failed = once(aggregator, 'round-failed');
    await aggregator.start();
    const task = await vehicles[0].nextTask();
    const acks = await Promise.all(
      vehicles.map((vehicle, k) => {
        const update = buildUpdate(vehicle.id, task, {
          numExamples: EXAMPLES[k],
          value: () => HONEST_DELTA * SCALES[k],
        });
        return vehicle.send(encodeModelUpdate(update));
      }),
    );
    // The bound is applied at the close, so every update is acked first.
    for (const ack of acks) assert.equal(ack.status, AckStatus.Accepted);

    const outcome: Pick<RoundOutcome, 'closed' | 'failed'> = await Promise.race(
      [
        closed.then(([event]) => ({ closed: event as RoundClosedEvent })),
        failed.then(([event]) => ({ failed: event as RoundFailedEvent })),
      ],
    );
    if (outcome.failed !== undefined) return { ...outcome, lines };
    const weights = new ModelStore(options.stateDir, MODEL_NAME).load(
      1,
    ).weights;
    const shifts = ['dense1/kernel', 'dense2/bias'].map((name) => {
      const base = workspace.baseWeights.get(name)!;
      return weights.get(name)!.map((value, i) => value - base[i]);
    });
    return { ...outcome, shifts, lines };
  } finally {
    await aggregator.stop();
    await Promise.all(vehicles.map((vehicle) => vehicle.close()));
    await broker.close();
    workspace.remove();
  }
}

function maxDistance(values: Float32Array, target: number): number {
  let distance = 0;
  for (const value of values) {
    distance = Math.max(distance, Math.abs(value - target));
  }
  return distance;
}

describe('norm bound in rounds', () => {
  test('reject leaves out huge update', async () => {
    const { closed, shifts, lines } = await runRound({
      normBound: { action: 'reject', medianFactor: MEDIAN_FACTOR },
    });

    const honest = weightedMean(
      SCALES.slice(0, 3).map((s) => HONEST_DELTA * s),
      EXAMPLES.slice(0, 3),
    );
    for (const shift of shifts!) assert.ok(maxDistance(shift, honest) < 1e-6);
    const bound = closed!.normBound!;
    assert.equal(bound.rejected, 1);
    assert.equal(bound.clipped, 0);
    assert.deepEqual(bound.rejectedVehicleIds, ['veh-3']);
    // Median of the four norms: the mean of the 1 and 1.1 ones.
    const median = normOf(HONEST_DELTA * 1.05);
    assert.ok(Math.abs(bound.medianNorm! - median) < 1e-6 * median);
    assert.ok(Math.abs(bound.bound! - MEDIAN_FACTOR * median) < 1e-5);
    assert.equal(closed!.accepted, 4);
    const line = lines.find((l) => l.msg === 'update dropped by norm bound');
    assert.equal(line?.vehicleId, 'veh-3');
    assert.ok(Math.abs((line!.norm as number) - normOf(5)) < 1e-3);
    assert.equal(line!.bound, bound.bound);
  });

  test('clip scales huge update to bound', async () => {
    const { closed, shifts, lines } = await runRound({
      normBound: { action: 'clip', medianFactor: MEDIAN_FACTOR },
    });

    // Clipped to 3 x the median norm, the attacker's constant delta is
    // 3 x 1.05 x HONEST_DELTA (less at most 2^-22 relative).
    const clippedValue = MEDIAN_FACTOR * 1.05 * HONEST_DELTA;
    const expected = weightedMean(
      [...SCALES.slice(0, 3).map((s) => HONEST_DELTA * s), clippedValue],
      EXAMPLES,
    );
    for (const shift of shifts!) {
      assert.ok(maxDistance(shift, expected) < 1e-6);
    }
    const bound = closed!.normBound!;
    assert.equal(bound.clipped, 1);
    assert.equal(bound.rejected, 0);
    assert.deepEqual(bound.clippedVehicleIds, ['veh-3']);
    const line = lines.find((l) => l.msg === 'update clipped by norm bound');
    assert.equal(line?.vehicleId, 'veh-3');
    assert.ok(Math.abs((line!.scale as number) - (3 * 1.05) / 500) < 1e-6);
  });

  test('fedavg without bound follows attacker', async () => {
    const { closed, shifts } = await runRound({});

    const mean = weightedMean(
      SCALES.map((s) => HONEST_DELTA * s),
      EXAMPLES,
    );
    assert.ok(maxDistance(shifts![1], mean) < 1e-5);
    assert.equal(closed!.normBound, undefined);
  });

  test('max norm bound clips', async () => {
    const maxNorm = normOf(HONEST_DELTA * 2);
    const { closed, shifts } = await runRound({
      normBound: { action: 'clip', maxNorm },
    });

    const expected = weightedMean(
      [...SCALES.slice(0, 3).map((s) => HONEST_DELTA * s), 2 * HONEST_DELTA],
      EXAMPLES,
    );
    assert.ok(maxDistance(shifts![1], expected) < 1e-6);
    assert.equal(closed!.normBound!.bound, maxNorm);
  });

  test('rejections below quorum fail round', async () => {
    const { failed } = await runRound({
      minUpdates: 4,
      normBound: { action: 'reject', medianFactor: MEDIAN_FACTOR },
    });

    assert.equal(failed?.reasonCode, ErrorCode.QuorumNotMet);
    assert.match(failed!.message, /3 updates within the norm bound/);
  });

  test('bound runs before median rule', async () => {
    const { shifts } = await runRound({
      aggregation: 'trimmed-mean',
      trimFraction: 0.25,
      normBound: { action: 'reject', medianFactor: MEDIAN_FACTOR },
    });

    // Three updates remain; floor(0.25 x 3) = 0 trimmed, so their
    // unweighted mean.
    const mean = (HONEST_DELTA * (1 + 1.1 + 0.9)) / 3;
    assert.ok(maxDistance(shifts![1], mean) < 1e-6);
  });
});

describe('norm bound options', () => {
  const base = {
    fleetId: 'f',
    brokerUrl: 'mqtt://127.0.0.1:1',
    stateDir: '/tmp/unused',
    baseWeightsPath: '/tmp/unused.pb',
  };

  test('default has no bound', () => {
    assert.equal(resolveOptions(base).normBound, undefined);
  });

  const bad: Array<[Partial<AggregatorOptions>, RegExp]> = [
    [
      { normBound: { action: 'drop' as never, medianFactor: 3 } },
      /normBound\.action is drop/,
    ],
    [{ normBound: { action: 'clip' } }, /normBound\.medianFactor/],
    [{ normBound: { action: 'clip', medianFactor: 0 } }, /medianFactor is 0/],
    [
      { normBound: { action: 'clip', medianFactor: Number.NaN } },
      /medianFactor is NaN/,
    ],
    [
      { normBound: { action: 'clip', medianFactor: Infinity } },
      /medianFactor is Infinity/,
    ],
    [{ normBound: { action: 'reject', maxNorm: -1 } }, /maxNorm is -1/],
    [
      {
        minUpdates: 2,
        secureAggregation: {},
        normBound: { action: 'clip', medianFactor: 3 },
      },
      /cannot be combined with secureAggregation/,
    ],
    [
      {
        differentialPrivacy: {
          clipNorm: 1,
          noiseMultiplier: 1,
          targetEpsilon: 8,
          delta: 1e-5,
        },
        normBound: { action: 'clip', medianFactor: 3 },
      },
      /cannot be combined with differentialPrivacy/,
    ],
  ];
  for (const [override, pattern] of bad) {
    test(`rejects ${pattern.source}`, () => {
      assert.throws(
        () => resolveOptions({ ...base, ...override }),
        isFleetError(ErrorCode.InvalidConfig, pattern),
      );
    });
  }

  test('flags default to clip', () => {
    const options: NormBoundOptions | undefined = normBoundOfFlags({
      normBoundMultiple: 4,
    });

    assert.deepEqual(options, {
      action: 'clip',
      medianFactor: 4,
      maxNorm: undefined,
    });
    assert.equal(normBoundOfFlags({}), undefined);
  });

  test('action flag needs bound', () => {
    assert.throws(
      () => normBoundOfFlags({ normBoundAction: 'reject' }),
      isFleetError(ErrorCode.InvalidConfig, /needs --norm-bound-multiple/),
    );
  });
});
