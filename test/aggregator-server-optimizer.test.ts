import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  after,
  afterEach,
  before,
  beforeEach,
  describe,
  test,
} from 'node:test';
import {
  Aggregator,
  ModelStore,
  SERVER_OPTIMIZER_FILE,
  ServerStep,
  resolveOptions,
  serverOptimizerOfFlags,
  type AggregatorOptions,
  type RoundClosedEvent,
  type RoundFailedEvent,
  type ServerOptimizerOptions,
} from '../aggregator/index.ts';
import { createServerOptimizerState } from '../aggregator/strategies/index.ts';
import type { RunningBroker } from '../broker/index.ts';
import {
  MODEL_NAME,
  TENSOR_SPECS,
  tensorNamesOfLayers,
  type WeightMap,
} from '../models/architecture.ts';
import {
  AckStatus,
  ErrorCode,
  FleetError,
  countElements,
  encodeModelUpdate,
} from '../protocol/index.ts';
import {
  TestVehicle,
  buildUpdate,
  createWorkspace,
  loadRealImages,
  quietLog,
  startTestBroker,
  testOptions,
  type RealImages,
  type Workspace,
} from './aggregator-fixtures.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));
const TRAINABLE = tensorNamesOfLayers(['dense1', 'dense2']);
const FEDAVGM = { optimizer: 'fedavgm', momentum: 0.9 } as const;
/** Server learning rate of the round tests; 1 would hide a missing scale. */
const SERVER_LR = 0.5;
/** Each vehicle sends a constant (times 1, 2 or 3 by index) delta. */
interface VehicleDelta {
  value: number;
  numExamples: number;
}
/**
 * Two vehicles with 10 and 30 examples, so FedAvg weighs them 1/4 and
 * 3/4. With dyadic values every mean is exact in float32.
 */
const ROUND_1: VehicleDelta[] = [
  { value: 2 ** -7, numExamples: 10 },
  { value: 3 * 2 ** -7, numExamples: 30 },
];
const ROUND_2: VehicleDelta[] = [
  { value: -(2 ** -8), numExamples: 10 },
  { value: 2 ** -6, numExamples: 30 },
];
const ROUND_3: VehicleDelta[] = [
  { value: 2 ** -6, numExamples: 10 },
  { value: -(2 ** -9), numExamples: 30 },
];

function isFleetError(code: string, pattern?: RegExp) {
  return (err: unknown): boolean =>
    err instanceof FleetError &&
    err.code === code &&
    (pattern === undefined || pattern.test(err.message));
}

function valueAt(delta: VehicleDelta, index: number): number {
  return delta.value * (1 + (index % 3));
}

/** FedAvg mean of a round, per trainable tensor, as the aggregator gets it. */
function meanDelta(round: readonly VehicleDelta[]): WeightMap {
  const total = round.reduce((sum, d) => sum + d.numExamples, 0);
  const mean: WeightMap = new Map();
  for (const name of TRAINABLE) {
    const size = countElements(
      TENSOR_SPECS.find((s) => s.name === name)!.shape,
    );
    const values = new Float32Array(size);
    for (let i = 0; i < size; i++) {
      let sum = 0;
      for (const d of round) sum += d.numExamples * valueAt(d, i);
      values[i] = sum / total;
    }
    mean.set(name, values);
  }
  return mean;
}

/** Runs one round with `vehicles` sending `round`; rejects if it fails. */
async function playRound(
  aggregator: Aggregator,
  vehicles: readonly TestVehicle[],
  round: readonly VehicleDelta[],
): Promise<RoundClosedEvent> {
  const closed = once(aggregator, 'round-closed');
  const failed = once(aggregator, 'round-failed');
  const tasks = await Promise.all(vehicles.map((v) => v.nextTask()));
  const acks = await Promise.all(
    vehicles.map((vehicle, k) => {
      const update = buildUpdate(vehicle.id, tasks[k], {
        numExamples: round[k].numExamples,
        value: (_name, index) => valueAt(round[k], index),
      });
      return vehicle.send(encodeModelUpdate(update));
    }),
  );
  for (const ack of acks) {
    assert.equal(
      ack.status,
      AckStatus.Accepted,
      `${ack.reasonCode}: ${ack.reason}`,
    );
  }
  const outcome = await Promise.race([
    closed.then(([event]) => event as RoundClosedEvent),
    failed.then(([event]) => {
      const { reasonCode, message } = event as RoundFailedEvent;
      throw new Error(`round failed: ${reasonCode} ${message}`);
    }),
  ]);
  return outcome;
}

/** Reads the trainable tensors of stored model `version`. */
function storedWeights(stateDir: string, version: number): WeightMap {
  return new ModelStore(stateDir, MODEL_NAME).load(version).weights;
}

/**
 * Computes the FedAvgM step by hand: m = β m + Δ, then w = w + η m, in float64
 * and in the order the optimizer computes it, rounded to float32 once.
 */
function fedAvgMStep(
  weights: WeightMap,
  delta: WeightMap,
  momentum: Map<string, number[]>,
): WeightMap {
  const next: WeightMap = new Map();
  for (const name of TRAINABLE) {
    const w = weights.get(name)!;
    const d = delta.get(name)!;
    const m = momentum.get(name) ?? new Array<number>(w.length).fill(0);
    const out = new Float32Array(w.length);
    for (let i = 0; i < w.length; i++) {
      m[i] = FEDAVGM.momentum * m[i] + d[i];
      out[i] = w[i] + SERVER_LR * m[i];
    }
    momentum.set(name, m);
    next.set(name, out);
  }
  return next;
}

function assertTrainableEqual(actual: WeightMap, expected: WeightMap): void {
  for (const name of TRAINABLE) {
    assert.deepEqual(actual.get(name), expected.get(name), `tensor ${name}`);
  }
}

function readStateFile(stateDir: string): {
  modelVersion: number;
  state: { optimizer: string; step: number };
} {
  return JSON.parse(
    readFileSync(join(stateDir, SERVER_OPTIMIZER_FILE), 'utf8'),
  );
}

let images: RealImages;

before(async () => {
  images = await loadRealImages();
});

describe('server optimizer options', () => {
  const base = {
    fleetId: 'f',
    brokerUrl: 'mqtt://127.0.0.1:1',
    stateDir: '/tmp/unused',
    baseWeightsPath: '/tmp/unused.pb',
  };

  test('default is plain step', () => {
    assert.equal(resolveOptions(base).serverOptimizer, undefined);
  });

  test('defaults follow fedopt values', () => {
    const fedavgm = resolveOptions({
      ...base,
      serverOptimizer: { optimizer: 'fedavgm' },
    }).serverOptimizer;
    const fedadam = resolveOptions({
      ...base,
      serverOptimizer: { optimizer: 'fedadam' },
    }).serverOptimizer;
    const fedadagrad = resolveOptions({
      ...base,
      serverOptimizer: { optimizer: 'fedadagrad', tau: 0.1 },
    }).serverOptimizer;

    assert.deepEqual(fedavgm, {
      optimizer: 'fedavgm',
      serverLearningRate: 1,
      momentum: 0.9,
    });
    assert.deepEqual(fedadam, {
      optimizer: 'fedadam',
      serverLearningRate: 0.01,
      beta1: 0.9,
      beta2: 0.99,
      tau: 1e-3,
    });
    assert.deepEqual(fedadagrad, {
      optimizer: 'fedadagrad',
      serverLearningRate: 0.01,
      beta1: 0.9,
      tau: 0.1,
    });
  });

  const bad: Array<[ServerOptimizerOptions, RegExp]> = [
    [{ optimizer: 'sgd' as never }, /optimizer is sgd/],
    [{ optimizer: 'fedavgm', serverLearningRate: 0 }, /serverLearningRate/],
    [{ optimizer: 'fedadam', serverLearningRate: NaN }, /serverLearningRate/],
    [{ optimizer: 'fedavgm', momentum: 1 }, /momentum is 1/],
    [{ optimizer: 'fedavgm', momentum: -0.1 }, /momentum/],
    [{ optimizer: 'fedadam', beta1: 1.5 }, /beta1/],
    [{ optimizer: 'fedyogi', beta2: 1 }, /beta2/],
    [{ optimizer: 'fedadagrad', tau: 0 }, /tau/],
    [{ optimizer: 'fedadam', momentum: 0.9 }, /momentum .*fedadam takes/],
    [{ optimizer: 'fedadagrad', beta2: 0.99 }, /beta2 .*fedadagrad takes/],
    [{ optimizer: 'fedavgm', tau: 0.001 }, /tau .*fedavgm takes/],
  ];
  for (const [serverOptimizer, pattern] of bad) {
    test(`rejects ${JSON.stringify(serverOptimizer)}`, () => {
      assert.throws(
        () => resolveOptions({ ...base, serverOptimizer }),
        isFleetError(ErrorCode.InvalidConfig, pattern),
      );
    });
  }

  test('flags need server optimizer', () => {
    assert.throws(
      () => serverOptimizerOfFlags({ serverLr: 0.1 }),
      isFleetError(ErrorCode.InvalidConfig, /need --server-optimizer/),
    );
    assert.equal(serverOptimizerOfFlags({}), undefined);
  });

  test('flags pass given values', () => {
    const options = serverOptimizerOfFlags({
      serverOptimizer: 'fedyogi',
      serverLr: 0.03,
      serverBeta2: 0.9,
    });

    assert.deepEqual(options, {
      optimizer: 'fedyogi',
      serverLearningRate: 0.03,
      beta2: 0.9,
    });
  });

  test('command line rejects bad combination', async () => {
    const child = spawn(
      process.execPath,
      [
        '--import',
        'tsx',
        'aggregator/main.ts',
        '--state-dir',
        '/tmp/fleetlearn-never-created',
        '--server-optimizer',
        'fedadam',
        '--server-momentum',
        '0.9',
      ],
      { cwd: REPOSITORY_ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
    const [code] = await once(child, 'exit');
    clearTimeout(timer);

    assert.equal(code, 2, stderr);
    assert.match(stderr, /serverOptimizer\.momentum/);
  });
});

describe('server step', () => {
  const sizes = new Map([['w', 2]]);
  let workspace: Workspace;

  before(() => {
    workspace = createWorkspace();
  });

  after(() => workspace.remove());

  function openStep(modelVersion: number): ServerStep {
    return ServerStep.open({
      stateDir: workspace.dir,
      config: { optimizer: 'fedavgm', serverLearningRate: 1, momentum: 0.5 },
      tensorSizes: sizes,
      modelVersion,
      log: quietLog,
    });
  }

  test('propose alone keeps moments', () => {
    const step = openStep(0);
    const weights = new Map([['w', Float32Array.from([1, 1])]]);
    const delta = new Map([['w', Float32Array.from([0.5, -0.5])]]);

    const first = step.propose(weights, delta);
    const again = step.propose(weights, delta);

    assert.deepEqual(again.weights.get('w'), first.weights.get('w'));
    assert.equal(step.step, 0);
    assert.equal(existsSync(step.path), false);
  });

  test('commit saves moments of version', () => {
    const step = openStep(0);
    const weights = new Map([['w', Float32Array.from([1, 1])]]);
    const delta = new Map([['w', Float32Array.from([0.5, -0.5])]]);

    step.propose(weights, delta).commit(1);
    const reopened = openStep(1);
    const second = reopened.propose(weights, delta);

    assert.equal(reopened.step, 1);
    // m = 0.5 * 0.5 + 0.5 = 0.75, so w = 1 + 0.75.
    assert.deepEqual([...second.weights.get('w')!], [1.75, 0.25]);
  });

  test('other version resets moments', () => {
    const step = openStep(0);
    const weights = new Map([['w', Float32Array.from([1, 1])]]);
    const delta = new Map([['w', Float32Array.from([0.5, -0.5])]]);
    step.propose(weights, delta).commit(4);

    const reset = openStep(2);

    assert.equal(reset.step, 0);
    assert.deepEqual(
      [...reset.propose(weights, delta).weights.get('w')!],
      [1.5, 0.5],
    );
  });
});

describe('server optimizer in rounds', () => {
  /** A fresh broker per test, so no retained status of another test's vehicles. */
  let broker: RunningBroker;

  beforeEach(async () => {
    broker = await startTestBroker();
  });

  afterEach(async () => {
    await broker.close();
  });

  function options(
    workspace: Workspace,
    overrides: Partial<AggregatorOptions> = {},
  ): AggregatorOptions {
    return testOptions(broker, workspace, images, {
      minVehiclesOnline: 2,
      minUpdates: 2,
      serverOptimizer: { ...FEDAVGM, serverLearningRate: SERVER_LR },
      ...overrides,
    });
  }

  async function connectVehicles(prefix: string): Promise<TestVehicle[]> {
    return Promise.all(
      [0, 1].map((k) => TestVehicle.connect(broker, `${prefix}-${k}`)),
    );
  }

  test('fedavgm survives restart exactly', async () => {
    const workspace = createWorkspace();
    const vehicles = await connectVehicles('restart');
    const stateDir = options(workspace).stateDir;
    let aggregator = new Aggregator(options(workspace));
    try {
      await aggregator.start();
      await playRound(aggregator, vehicles, ROUND_1);
      await aggregator.stop();
      const afterRound1 = readStateFile(stateDir);
      aggregator = new Aggregator(options(workspace));
      await aggregator.start();
      const closed = await playRound(aggregator, vehicles, ROUND_2);

      const momentum = new Map<string, number[]>();
      const v1 = fedAvgMStep(
        workspace.baseWeights,
        meanDelta(ROUND_1),
        momentum,
      );
      const v2 = fedAvgMStep(v1, meanDelta(ROUND_2), momentum);
      assert.equal(afterRound1.modelVersion, 1);
      assert.equal(afterRound1.state.step, 1);
      assert.equal(closed.modelVersion, 2);
      assertTrainableEqual(storedWeights(stateDir, 1), v1);
      assertTrainableEqual(storedWeights(stateDir, 2), v2);
      assert.deepEqual(
        storedWeights(stateDir, 2).get('conv1/kernel'),
        workspace.baseWeights.get('conv1/kernel'),
      );
      assert.equal(readStateFile(stateDir).state.step, 2);
      // Without momentum round 2 would give v1 + η Δ2.
      const plain = fedAvgMStep(v1, meanDelta(ROUND_2), new Map());
      assert.notDeepEqual(v2.get('dense2/bias'), plain.get('dense2/bias'));
    } finally {
      await aggregator.stop();
      await Promise.all(vehicles.map((vehicle) => vehicle.close()));
      workspace.remove();
    }
  });

  test('rollback resets momentum', async () => {
    const workspace = createWorkspace();
    let vehicles = await connectVehicles('rollback');
    const stateDir = options(workspace).stateDir;
    const aggregator = new Aggregator(options(workspace, { maxRounds: 0 }));
    try {
      await aggregator.start();
      await playRound(aggregator, vehicles, ROUND_1);
      await playRound(aggregator, vehicles, ROUND_2);
      // The rollback clears the retained round task with an empty
      // message, which TestVehicle cannot decode, so reconnect after it.
      await Promise.all(vehicles.map((vehicle) => vehicle.close()));
      await aggregator.rollbackTo(1);
      vehicles = await connectVehicles('rollback');
      const closed = await playRound(aggregator, vehicles, ROUND_3);

      const v1 = storedWeights(stateDir, 1);
      const expected = fedAvgMStep(v1, meanDelta(ROUND_3), new Map());
      assert.equal(closed.modelVersion, 3);
      assertTrainableEqual(storedWeights(stateDir, 3), expected);
      assert.equal(readStateFile(stateDir).modelVersion, 3);
      assert.equal(readStateFile(stateDir).state.step, 1);
    } finally {
      await aggregator.stop();
      await Promise.all(vehicles.map((vehicle) => vehicle.close()));
      workspace.remove();
    }
  });

  test('failed export keeps state file', async () => {
    const workspace = createWorkspace();
    // Version 0 is exported once with the default tolerance, before any
    // vehicle is online to start a round.
    const first = new Aggregator(options(workspace));
    await first.start();
    await first.stop();
    const vehicles = await connectVehicles('export');
    // No ONNX export matches TF.js within the smallest positive double.
    const aggregator = new Aggregator(
      options(workspace, { exportToleranceAbs: Number.MIN_VALUE }),
    );
    try {
      const failed = once(aggregator, 'round-failed');
      await aggregator.start();
      const tasks = await Promise.all(vehicles.map((v) => v.nextTask()));
      await Promise.all(
        vehicles.map((vehicle, k) =>
          vehicle.send(encodeModelUpdate(buildUpdate(vehicle.id, tasks[k]))),
        ),
      );
      const [event] = (await failed) as [RoundFailedEvent];

      assert.equal(event.reasonCode, ErrorCode.ExportMismatch);
      const path = join(options(workspace).stateDir, SERVER_OPTIMIZER_FILE);
      assert.equal(existsSync(path), false);
    } finally {
      await aggregator.stop();
      await Promise.all(vehicles.map((vehicle) => vehicle.close()));
      workspace.remove();
    }
  });
});

describe('server optimizer state file', () => {
  let workspace: Workspace;

  before(() => {
    workspace = createWorkspace();
  });

  after(() => workspace.remove());

  /** Writes a state file for `optimizer` over `layers` at version 0. */
  function writeStateFile(optimizer: 'fedavgm' | 'fedadam', layers: string[]) {
    const sizes = new Map(
      tensorNamesOfLayers(layers).map((name) => [
        name,
        countElements(TENSOR_SPECS.find((s) => s.name === name)!.shape),
      ]),
    );
    const state = createServerOptimizerState(optimizer, sizes, 1e-6);
    const stateDir = join(workspace.dir, 'state');
    const path = join(stateDir, SERVER_OPTIMIZER_FILE);
    mkdirSync(stateDir, { recursive: true });
    writeFileSync(path, JSON.stringify({ modelVersion: 0, state }));
    return path;
  }

  async function startWith(
    overrides: Partial<AggregatorOptions>,
  ): Promise<void> {
    const aggregator = new Aggregator({
      fleetId: 'f',
      // start() fails before it connects.
      brokerUrl: 'mqtt://127.0.0.1:1',
      stateDir: join(workspace.dir, 'state'),
      baseWeightsPath: workspace.baseWeightsPath,
      probeImages: images.probeImages,
      probeCount: images.probeCount,
      log: quietLog,
      ...overrides,
    });
    try {
      await aggregator.start();
    } finally {
      await aggregator.stop();
    }
  }

  test('other optimizer fails start', async () => {
    const path = writeStateFile('fedavgm', ['dense1', 'dense2']);

    await assert.rejects(
      startWith({ serverOptimizer: { optimizer: 'fedadam' } }),
      isFleetError(
        ErrorCode.InvalidConfig,
        new RegExp(`${path} contains fedavgm moments.*optimizer is fedadam`),
      ),
    );
  });

  test('other tensors fail start', async () => {
    const path = writeStateFile('fedavgm', ['dense1', 'dense2']);

    await assert.rejects(
      startWith({
        trainableLayers: ['dense2'],
        serverOptimizer: { optimizer: 'fedavgm' },
      }),
      isFleetError(
        ErrorCode.InvalidConfig,
        new RegExp(`${path} contains moments of tensors .*dense1/bias`),
      ),
    );
  });

  test('corrupt file fails start', async () => {
    const path = writeStateFile('fedavgm', ['dense1', 'dense2']);
    writeFileSync(path, '{"modelVersion": 0, "state": ');

    await assert.rejects(
      startWith({ serverOptimizer: { optimizer: 'fedavgm' } }),
      isFleetError(ErrorCode.InvalidConfig, /cannot be read/),
    );
  });

  test('bad moments fail start', async () => {
    const path = writeStateFile('fedadam', ['dense1', 'dense2']);
    const file = JSON.parse(readFileSync(path, 'utf8'));
    file.state.tensors[0].secondMoment = [];
    writeFileSync(path, JSON.stringify(file));

    await assert.rejects(
      startWith({ serverOptimizer: { optimizer: 'fedadam' } }),
      isFleetError(ErrorCode.InvalidConfig, /secondMoment has 0 values/),
    );
  });
});
