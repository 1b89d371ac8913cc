import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { resolveOptions } from '../aggregator/options.ts';
import { buildRoundTask, compressionOfRound } from '../aggregator/messages.ts';
import { OpenRound } from '../aggregator/round.ts';
import { validateUpdate, type RoundContext } from '../aggregator/validate.ts';
import { MODEL_NAME } from '../models/architecture.ts';
import {
  CompressionKind,
  compressionOfFlags,
  compressionOfTask,
  encodeDeltaTensor,
  parseUpdateCompression,
  type CompressedWireTensor,
  type UpdateCompression,
} from '../protocol/compression/index.ts';
import {
  ErrorCode,
  FleetError,
  TensorEncoding,
  decodeRoundTask,
  encodeModelUpdate,
  encodeRoundTask,
  type ModelUpdate,
  type RoundTask,
} from '../protocol/index.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));

const SHAPES = new Map<string, number[]>([
  ['dense2/kernel', [128, 43]],
  ['dense2/bias', [43]],
]);
const INT8: UpdateCompression = { kind: CompressionKind.Int8, topkDensity: 0 };
const INT8_CHANNEL: UpdateCompression = {
  kind: CompressionKind.Int8Channel,
  topkDensity: 0,
};
const FLOAT16: UpdateCompression = {
  kind: CompressionKind.Float16,
  topkDensity: 0,
};
const FLOAT32: UpdateCompression = {
  kind: CompressionKind.Float32,
  topkDensity: 0,
};
const TOPK: UpdateCompression = {
  kind: CompressionKind.TopK,
  topkDensity: 0.01,
};

function context(updateCompression?: UpdateCompression): RoundContext {
  return {
    openRound: 5,
    lastRound: 5,
    modelName: MODEL_NAME,
    modelVersion: 3,
    selectedVehicles: new Set(['veh-1']),
    seenUpdateIds: new Set(),
    earlierAccepted: new Map(),
    acceptedVehicles: new Set(),
    acceptedExamples: 0,
    trainableShapes: SHAPES,
    maxMessageBytes: 1024 * 1024,
    maxExamplesPerUpdate: 1000,
    maxAbsDeltaValue: 10,
    updateCompression,
  };
}

/** Delta of `name` with values (i % 7 - 3) / 4, in [-0.75, 0.75]. */
function tensor(
  name: string,
  compression: UpdateCompression,
): CompressedWireTensor {
  const shape = SHAPES.get(name)!;
  const count = shape.reduce((a, b) => a * b, 1);
  const values = Float32Array.from(
    { length: count },
    (_, i) => ((i % 7) - 3) / 4,
  );
  return encodeDeltaTensor(name, shape, values, compression);
}

function update(
  compression: UpdateCompression,
  bias: CompressedWireTensor = tensor('dense2/bias', compression),
): Uint8Array {
  const message: ModelUpdate = {
    updateId: 'u-1',
    vehicleId: 'veh-1',
    modelName: MODEL_NAME,
    baseModelVersion: 3,
    round: 5,
    numExamples: 12,
    deltas: [tensor('dense2/kernel', compression), bias],
    metrics: {
      trainLoss: 1,
      trainAccuracy: 0.5,
      trainDurationMs: 3,
      backend: 'cpu',
    },
    createdAtMs: 1,
  };
  return encodeModelUpdate(message);
}

function rejection(payload: Uint8Array, ctx: RoundContext) {
  const decision = validateUpdate('veh-1', payload, ctx);
  assert.equal(decision.accepted, false, 'update was accepted');
  return decision as { code: string; reason: string };
}

function assertInvalidConfig(run: () => unknown): void {
  assert.throws(run, (err: unknown) => {
    assert.ok(err instanceof FleetError, `expected FleetError, got ${err}`);
    assert.equal(err.code, ErrorCode.InvalidConfig);
    return true;
  });
}

describe('validateUpdate with compression', () => {
  test('int8 update accepted and dequantized', () => {
    const decision = validateUpdate('veh-1', update(INT8), context(INT8));

    assert.equal(decision.accepted, true);
    assert.ok(decision.accepted);
    const kernel = decision.deltas.get('dense2/kernel')!;
    assert.equal(kernel.length, 128 * 43);
    // Scale 0.75 / 127 represents -0.75, 0 and 0.75 exactly enough.
    assert.ok(Math.abs(kernel[0] - -0.75) < 1e-6);
    assert.ok(Math.abs(kernel[3]) < 1e-9);
  });

  test('either int8 scale form accepted', () => {
    for (const [round, sent] of [
      [INT8, INT8_CHANNEL],
      [INT8_CHANNEL, INT8],
    ]) {
      const decision = validateUpdate('veh-1', update(sent), context(round));
      assert.equal(decision.accepted, true);
    }
  });

  test('float32 update rejected in int8 round', () => {
    const { code, reason } = rejection(update(FLOAT32), context(INT8));

    assert.equal(code, ErrorCode.UnsupportedEncoding);
    assert.match(
      reason,
      /encoding 1 \(float32\), but round 5 expects encoding 3 \(int8\)/,
    );
  });

  test('float16 rejected in default round', () => {
    const { code, reason } = rejection(update(FLOAT16), context());

    assert.equal(code, ErrorCode.UnsupportedEncoding);
    assert.match(reason, /expects encoding 1 \(float32\)/);
  });

  test('float16 update accepted in float16 round', () => {
    const decision = validateUpdate('veh-1', update(FLOAT16), context(FLOAT16));

    assert.equal(decision.accepted, true);
  });

  test('topk above density rejected', () => {
    const dense = tensor('dense2/bias', { ...TOPK, topkDensity: 0.5 });

    const { code, reason } = rejection(update(TOPK, dense), context(TOPK));

    assert.equal(code, ErrorCode.UnsupportedEncoding);
    assert.match(reason, /carries 22 values, but round 5 allows at most 1/);
  });

  test('topk update accepted', () => {
    const decision = validateUpdate('veh-1', update(TOPK), context(TOPK));

    assert.ok(decision.accepted);
    const kernel = decision.deltas.get('dense2/kernel')!;
    const sent = kernel.filter((value) => value !== 0).length;
    assert.equal(sent, Math.ceil(0.01 * 128 * 43));
  });

  test('topk bad indices rejected', () => {
    const good = tensor('dense2/bias', { ...TOPK, topkDensity: 0.05 });
    const loose = { ...TOPK, topkDensity: 0.05 };
    const cases: Array<[string, number[], string]> = [
      ['unsorted', [5, 2, 9], ErrorCode.MalformedPayload],
      ['duplicated', [2, 2, 9], ErrorCode.MalformedPayload],
      ['out of range', [2, 9, 43], ErrorCode.MalformedPayload],
    ];
    for (const [what, indices, expected] of cases) {
      const bad = { ...good, indices };
      const { code } = rejection(update(loose, bad), context(loose));
      assert.equal(code, expected, what);
    }
    const short = { ...good, data: good.data.subarray(0, 8) };
    assert.equal(
      rejection(update(loose, short), context(loose)).code,
      ErrorCode.WrongShape,
    );
  });

  test('int8 bad scale rejected', () => {
    const good = tensor('dense2/bias', INT8);
    for (const scale of [Number.NaN, 0, -0.5]) {
      const { code } = rejection(
        update(INT8, { ...good, scale }),
        context(INT8),
      );
      assert.equal(code, ErrorCode.MalformedPayload, `scale ${scale}`);
    }
    const short = { ...good, data: good.data.subarray(0, 40) };
    assert.equal(
      rejection(update(INT8, short), context(INT8)).code,
      ErrorCode.WrongShape,
    );
  });

  test('float16 infinity and range rejected', () => {
    const good = tensor('dense2/bias', FLOAT16);
    const infinite = Uint8Array.from(good.data);
    infinite.set([0x00, 0x7c], 6);
    const large = Uint8Array.from(good.data);
    large.set([0xd0, 0x67], 6); // 2000 in float16

    const nonFinite = rejection(
      update(FLOAT16, { ...good, data: infinite }),
      context(FLOAT16),
    );
    const outOfRange = rejection(
      update(FLOAT16, { ...good, data: large }),
      context(FLOAT16),
    );

    assert.equal(nonFinite.code, ErrorCode.NonFiniteValue);
    assert.equal(outOfRange.code, ErrorCode.ValueOutOfRange);
  });
});

describe('round task compression', () => {
  const base = {
    fleetId: 'f',
    brokerUrl: 'mqtt://127.0.0.1:1',
    stateDir: '/nonexistent',
    baseWeightsPath: '/nonexistent/base.pb',
  };

  test('task announces the compression', () => {
    const options = resolveOptions({ ...base, updateCompression: TOPK });
    const round = new OpenRound({
      round: 4,
      baseModelVersion: 2,
      selected: ['veh-1'],
      tensorSizes: new Map([['dense2/bias', 43]]),
      timeoutMs: 60_000,
    });
    try {
      assert.deepEqual(compressionOfRound(round), FLOAT32);

      const task = buildRoundTask(round, options, MODEL_NAME, 'a'.repeat(64));
      const decoded = decodeRoundTask(encodeRoundTask(task));

      assert.deepEqual(compressionOfRound(round), TOPK);
      const announced = compressionOfTask(decoded);
      assert.equal(announced.kind, CompressionKind.TopK);
      assert.equal(announced.topkDensity, Math.fround(0.01));
    } finally {
      round.close('stopped');
    }
  });

  test('task without compression means float32', () => {
    const task = { modelName: MODEL_NAME } as RoundTask;

    assert.deepEqual(compressionOfTask(task), FLOAT32);
    assert.deepEqual(
      compressionOfTask({ ...task, compression: null } as RoundTask),
      FLOAT32,
    );
  });

  test('task with unknown kind rejected', () => {
    const task = { compression: { kind: 9, topkDensity: 0 } };

    assertInvalidConfig(() => compressionOfTask(task as unknown as RoundTask));
  });

  test('options reject bad compression', () => {
    assertInvalidConfig(() =>
      resolveOptions({
        ...base,
        updateCompression: { ...TOPK, topkDensity: 0 },
      }),
    );
    assertInvalidConfig(() =>
      resolveOptions({
        ...base,
        updateCompression: { kind: 7, topkDensity: 0 },
      }),
    );
    assert.deepEqual(resolveOptions(base).updateCompression, FLOAT32);
  });

  test('flags parse and reject', () => {
    assert.deepEqual(
      compressionOfFlags({ updateCompression: 'topk', topkDensity: 0.05 }),
      { kind: CompressionKind.TopK, topkDensity: 0.05 },
    );
    assert.deepEqual(parseUpdateCompression('int8-channel'), INT8_CHANNEL);
    assert.equal(compressionOfFlags({}), undefined);
    assertInvalidConfig(() => parseUpdateCompression('zip'));
    assertInvalidConfig(() => parseUpdateCompression('topk', 1.5));
    assertInvalidConfig(() => parseUpdateCompression('topk', Number.NaN));
    assertInvalidConfig(() =>
      compressionOfFlags({ updateCompression: 'int8', topkDensity: 0.1 }),
    );
    assertInvalidConfig(() => compressionOfFlags({ topkDensity: 0.1 }));
  });
});

describe('compression command-line flags', () => {
  function run(script: string, args: string[]) {
    return spawnSync(process.execPath, ['--import', 'tsx', script, ...args], {
      cwd: REPOSITORY_ROOT,
      encoding: 'utf8',
      timeout: 60_000,
    });
  }

  test('aggregator rejects density above 1', () => {
    const result = run('aggregator/main.ts', [
      '--update-compression',
      'topk',
      '--topk-density',
      '2',
      '--log-level',
      'silent',
    ]);

    assert.equal(result.status, 2, result.stderr);
    assert.match(result.stderr, /top-k density 2 is out of range/);
  });

  test('aggregator rejects unknown kind', () => {
    const result = run('aggregator/main.ts', ['--update-compression', 'zip']);

    assert.notEqual(result.status, 0);
    assert.match(result.stderr, /--update-compression.*zip.*float32/s);
  });

  test('simulate rejects density without topk', () => {
    const result = run('scripts/simulate.ts', ['--topk-density', '0.5']);

    assert.equal(result.status, 1, result.stderr);
    assert.match(result.stderr, /--topk-density 0.5 applies only to/);
  });
});
