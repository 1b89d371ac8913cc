import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import {
  Aggregator,
  ClippedSum,
  differentialPrivacyOfFlags,
  resolveOptions,
  type AggregatorOptions,
  type DifferentialPrivacyOptions,
  type RoundClosedEvent,
} from '../aggregator/index.ts';
import { PrivacyBudget } from '../privacy/index.ts';
import {
  AckStatus,
  ErrorCode,
  FleetError,
  encodeModelUpdate,
} from '../protocol/index.ts';
import {
  DEFAULT_TRAINABLE_LAYERS,
  TENSOR_SPECS,
  tensorNamesOfLayers,
} from '../models/architecture.ts';
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
  type Workspace,
} from './aggregator-fixtures.ts';

const TRAINABLE = tensorNamesOfLayers([...DEFAULT_TRAINABLE_LAYERS]);
const VALUES = TENSOR_SPECS.filter((spec) =>
  TRAINABLE.includes(spec.name),
).reduce((total, spec) => total + spec.shape.reduce((a, b) => a * b, 1), 0);
const DELTA = 1e-5;
/** Small enough that the noise is far below the tolerances below. */
const TINY_Z = 1e-6;

let images: RealImages;

before(async () => {
  images = await loadRealImages();
});

function dpOf(
  overrides: Partial<DifferentialPrivacyOptions>,
): DifferentialPrivacyOptions {
  return {
    clipNorm: 1,
    noiseMultiplier: TINY_Z,
    targetEpsilon: 1e15,
    delta: DELTA,
    ...overrides,
  };
}

interface Fleet {
  broker: Awaited<ReturnType<typeof startTestBroker>>;
  aggregator: Aggregator;
  vehicles: TestVehicle[];
  closed: RoundClosedEvent[];
  workspace: Workspace;
  close(): Promise<void>;
}

/**
 * Starts a broker, `count` vehicles and an aggregator. Every selected
 * vehicle not named in `silent` sends an update of the constant
 * value(id) each round, with numExamples growing by vehicle.
 */
async function startFleet(
  count: number,
  overrides: Partial<AggregatorOptions>,
  value: (id: string) => number,
  silent: readonly string[] = [],
  workspace = createWorkspace(),
): Promise<Fleet> {
  const broker = await startTestBroker();
  const ids = Array.from({ length: count }, (_, k) => `veh-${k}`);
  const vehicles = await Promise.all(
    ids.map((id) => TestVehicle.connect(broker, id)),
  );
  const aggregator = new Aggregator(
    testOptions(broker, workspace, images, {
      minVehiclesOnline: count,
      ...overrides,
    }),
  );
  const closed: RoundClosedEvent[] = [];
  aggregator.on('round-closed', (event) => closed.push(event));
  let running = true;
  const answer = async (): Promise<void> => {
    while (running) {
      const task = await vehicles[0].nextTask(500).catch(() => undefined);
      if (task === undefined) continue;
      const senders = vehicles.filter(
        (vehicle) =>
          task.selectedVehicles.includes(vehicle.id) &&
          !silent.includes(vehicle.id),
      );
      const acks = await Promise.all(
        senders.map((vehicle, k) => {
          const update = buildUpdate(vehicle.id, task, {
            numExamples: 10 + 500 * k,
            value: () => value(vehicle.id),
          });
          return vehicle.send(encodeModelUpdate(update));
        }),
      );
      for (const ack of acks) assert.equal(ack.status, AckStatus.Accepted);
    }
  };
  await aggregator.start();
  const answering = answer();
  return {
    broker,
    aggregator,
    vehicles,
    closed,
    workspace,
    async close() {
      running = false;
      await aggregator.stop();
      await Promise.all(vehicles.map((vehicle) => vehicle.close()));
      await broker.close();
      await answering.catch(() => undefined);
    },
  };
}

/** Released trainable tensors minus the base, flattened. */
async function releasedShift(fleet: Fleet): Promise<Float64Array> {
  const release = await fetchRetainedRelease(fleet.broker);
  const weights = importOnnxWeights(release.onnx);
  const shift = new Float64Array(VALUES);
  let offset = 0;
  for (const name of TRAINABLE) {
    const released = weights.get(name)!;
    const base = fleet.workspace.baseWeights.get(name)!;
    for (let i = 0; i < base.length; i++) {
      shift[offset++] = released[i] - base[i];
    }
  }
  return shift;
}

function normOf(values: Float64Array): number {
  return Math.sqrt(values.reduce((sum, value) => sum + value * value, 0));
}

function budgetEpsilons(z: number, rate: number, rounds: number): number[] {
  const budget = new PrivacyBudget({ noiseMultiplier: z });
  const epsilons: number[] = [];
  for (let r = 0; r < rounds; r++) {
    budget.step(rate);
    epsilons.push(budget.epsilon(DELTA));
  }
  return epsilons;
}

describe('DP-FedAvg rounds', () => {
  test('large update contributes clip norm', async () => {
    const fleet = await startFleet(
      1,
      { differentialPrivacy: dpOf({ clipNorm: 0.5 }) },
      () => 0.5,
    );
    try {
      await fleet.aggregator.whenFinished();
      const norm = normOf(await releasedShift(fleet));
      // The raw update has norm 0.5 x sqrt(VALUES), about 185.
      assert.ok(Math.abs(norm - 0.5) < 1e-3, `norm ${norm}`);
      assert.equal(fleet.closed[0].privacy?.clippedUpdates, 1);
    } finally {
      await fleet.close();
    }
  });

  test('mean divides clipped sum by selected', async () => {
    // Three of four selected vehicles send an update, so m = 4 at the
    // deadline. veh-0 is far above the clip norm, and the others are below.
    const values: Record<string, number> = {
      'veh-0': 1,
      'veh-1': 0.001,
      'veh-2': 0.002,
    };
    const fleet = await startFleet(
      4,
      {
        differentialPrivacy: dpOf({ clipNorm: 1 }),
        roundTimeoutMs: 3000,
        minUpdates: 3,
      },
      (id) => values[id],
      ['veh-3'],
    );
    try {
      await fleet.aggregator.whenFinished();
      const shift = await releasedShift(fleet);
      const clipped = 1 / Math.sqrt(VALUES);
      const expected = (clipped + 0.001 + 0.002) / 4;
      const worst = shift.reduce(
        (max, value) => Math.max(max, Math.abs(value - expected)),
        0,
      );
      assert.ok(worst < 2e-6, `max difference ${worst}`);
    } finally {
      await fleet.close();
    }
  });

  test('epsilon grows and matches budget', async () => {
    const z = 1;
    const fleet = await startFleet(
      2,
      {
        differentialPrivacy: dpOf({ noiseMultiplier: z, targetEpsilon: 100 }),
        vehiclesPerRound: 1,
        maxRounds: 3,
      },
      () => 0.001,
    );
    try {
      await fleet.aggregator.whenFinished();
      const epsilons = fleet.closed.map((event) => event.epsilon);
      const expected = budgetEpsilons(z, 0.5, 3);
      assert.equal(epsilons.length, 3);
      epsilons.forEach((epsilon, r) => {
        assert.ok(Math.abs(epsilon! - expected[r]) < 1e-9, `round ${r + 1}`);
      });
      assert.ok(expected[0] < expected[1]);
      assert.ok(expected[1] < expected[2]);
      const saved = JSON.parse(
        readFileSync(
          join(fleet.workspace.dir, 'state', 'privacy.json'),
          'utf8',
        ),
      );
      assert.equal(saved.rounds, 3);
    } finally {
      await fleet.close();
    }
  });

  test('spent budget stops the rounds', async () => {
    const z = 1;
    const expected = budgetEpsilons(z, 1, 3);
    // Between the epsilon of two and of three rounds: two rounds run.
    const targetEpsilon = (expected[1] + expected[2]) / 2;
    const dp = dpOf({ noiseMultiplier: z, targetEpsilon });
    const fleet = await startFleet(
      2,
      { differentialPrivacy: dp, maxRounds: 10 },
      () => 0.001,
    );
    const { workspace } = fleet;
    try {
      await fleet.aggregator.whenFinished();
      assert.equal(fleet.closed.length, 2);
      assert.equal(fleet.aggregator.roundsCompleted, 2);
      assert.ok(Math.abs(fleet.closed[1].epsilon! - expected[1]) < 1e-9);
    } finally {
      await fleet.close();
    }
    // A restart loads privacy.json and runs no further round.
    const again = await startFleet(
      2,
      { differentialPrivacy: dp, maxRounds: 10 },
      () => 0.001,
      [],
      workspace,
    );
    try {
      await again.aggregator.whenFinished();
      assert.equal(again.closed.length, 0);
    } finally {
      await again.close();
      workspace.remove();
    }
  });
});

describe('DP-FedAvg settings', () => {
  function optionsWith(overrides: Partial<AggregatorOptions>) {
    return {
      fleetId: 'fleet',
      brokerUrl: 'mqtt://127.0.0.1:1',
      stateDir: '/tmp/unused-state',
      baseWeightsPath: '/tmp/unused.weights.pb',
      ...overrides,
    };
  }

  function assertInvalid(fn: () => unknown): void {
    assert.throws(
      fn,
      (err: unknown) =>
        err instanceof FleetError && err.code === ErrorCode.InvalidConfig,
    );
  }

  test('invalid settings are rejected', () => {
    const bad: Partial<DifferentialPrivacyOptions>[] = [
      { clipNorm: 0 },
      { noiseMultiplier: -1 },
      { targetEpsilon: Number.POSITIVE_INFINITY },
      { delta: 0 },
      { delta: 1 },
      { seed: 1.5 },
    ];
    for (const overrides of bad) {
      assertInvalid(() =>
        resolveOptions(optionsWith({ differentialPrivacy: dpOf(overrides) })),
      );
    }
    assertInvalid(() =>
      resolveOptions(
        optionsWith({ aggregation: 'median', differentialPrivacy: dpOf({}) }),
      ),
    );
    const resolved = resolveOptions(
      optionsWith({ seed: 9, differentialPrivacy: dpOf({}) }),
    );
    assert.equal(resolved.differentialPrivacy?.seed, 9);
    assert.equal(
      resolveOptions(optionsWith({})).differentialPrivacy,
      undefined,
    );
  });

  test('dp flags need all four', () => {
    assert.equal(differentialPrivacyOfFlags({}), undefined);
    assertInvalid(() =>
      differentialPrivacyOfFlags({ dpClipNorm: 1, dpNoiseMultiplier: 1 }),
    );
    assert.deepEqual(
      differentialPrivacyOfFlags({
        dpClipNorm: 1,
        dpNoiseMultiplier: 2,
        dpTargetEpsilon: 3,
        dpDelta: DELTA,
      }),
      { clipNorm: 1, noiseMultiplier: 2, targetEpsilon: 3, delta: DELTA },
    );
  });

  test('zero noise gives clipped mean', () => {
    const sizes = new Map([['t', 2]]);
    const sum = new ClippedSum(sizes, 1);
    sum.add(new Map([['t', Float32Array.of(3, 4)]]));
    sum.add(new Map([['t', Float32Array.of(0.5, 0)]]));
    const dp = { ...dpOf({}), noiseMultiplier: 0, seed: 1 };
    const mean = sum.noisyMean(4, { ...dp, noiseSource: 'seeded' }, 1);
    // (0.6, 0.8) + (0.5, 0), over m = 4.
    assert.ok(Math.abs(mean.get('t')![0] - 1.1 / 4) < 1e-7);
    assert.ok(Math.abs(mean.get('t')![1] - 0.8 / 4) < 1e-7);
    assert.equal(sum.clippedCount, 1);
    assert.equal(sum.medianNorm, 2.75);
    assert.ok(!existsSync('/tmp/unused-state/privacy.json'));
  });
});
