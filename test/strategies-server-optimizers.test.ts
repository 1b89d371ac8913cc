import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  type ServerOptimizerConfig,
  type ServerOptimizerState,
  applyServerOptimizer,
  parseServerOptimizerState,
} from '../aggregator/strategies/index.ts';
import { ErrorCode, FleetError } from '../protocol/index.ts';

function tensors(values: Record<string, number[]>): Map<string, Float32Array> {
  return new Map(
    Object.entries(values).map(([name, v]) => [name, Float32Array.from(v)]),
  );
}

function isFleetError(code: string) {
  return (err: unknown) => err instanceof FleetError && err.code === code;
}

const ADAM: ServerOptimizerConfig = {
  optimizer: 'fedadam',
  serverLearningRate: 1,
  beta1: 0.5,
  beta2: 0.5,
  tau: 1,
};

describe('applyServerOptimizer fedavgm', () => {
  test('fedavgm first step adds delta', () => {
    const weights = tensors({ w: [1, 2] });
    const delta = tensors({ w: [0.5, -1] });

    const { weights: next, state } = applyServerOptimizer(
      weights,
      delta,
      undefined,
      { optimizer: 'fedavgm', serverLearningRate: 1, momentum: 0.9 },
    );

    // m = 0.9 * 0 + delta = [0.5, -1]; x = [1 + 0.5, 2 - 1]
    assert.deepEqual([...next.get('w')!], [1.5, 1]);
    assert.deepEqual(state.tensors[0].firstMoment, [0.5, -1]);
    assert.deepEqual(state.tensors[0].secondMoment, []);
    assert.equal(state.step, 1);
  });

  test('fedavgm accumulates momentum', () => {
    const config: ServerOptimizerConfig = {
      optimizer: 'fedavgm',
      serverLearningRate: 0.5,
      momentum: 0.5,
    };
    const delta = tensors({ w: [1] });

    const first = applyServerOptimizer(
      tensors({ w: [0] }),
      delta,
      undefined,
      config,
    );
    const second = applyServerOptimizer(
      first.weights,
      delta,
      first.state,
      config,
    );

    // step 1: m = 1, x = 0 + 0.5 * 1 = 0.5
    assert.deepEqual([...first.weights.get('w')!], [0.5]);
    // step 2: m = 0.5 * 1 + 1 = 1.5, x = 0.5 + 0.5 * 1.5 = 1.25
    assert.deepEqual(second.state.tensors[0].firstMoment, [1.5]);
    assert.deepEqual([...second.weights.get('w')!], [1.25]);
    assert.equal(second.state.step, 2);
  });

  test('fedavgm without momentum is fedavg', () => {
    const weights = tensors({ w: [0.1, -0.2, 3] });
    const delta = tensors({ w: [0.25, 0.5, -1.5] });

    const { weights: next } = applyServerOptimizer(weights, delta, undefined, {
      optimizer: 'fedavgm',
      serverLearningRate: 1,
      momentum: 0,
    });

    const expected = [0.1, -0.2, 3].map((x, i) =>
      Math.fround(Math.fround(x) + [0.25, 0.5, -1.5][i]),
    );
    assert.deepEqual([...next.get('w')!], expected);
  });
});

describe('applyServerOptimizer adaptive', () => {
  test('fedadam first step by hand', () => {
    const weights = tensors({ w: [0, 0, 0, 0] });
    const delta = tensors({ w: [7, -7, 1, 0] });

    const { weights: next, state } = applyServerOptimizer(
      weights,
      delta,
      undefined,
      ADAM,
    );

    // v starts at tau^2 = 1; m = 0.5 * 0 + 0.5 * d
    assert.deepEqual(state.tensors[0].firstMoment, [3.5, -3.5, 0.5, 0]);
    // v = 0.5 * 1 + 0.5 * d^2: 0.5 + 24.5 = 25, 25, 0.5 + 0.5 = 1, 0.5
    assert.deepEqual(state.tensors[0].secondMoment, [25, 25, 1, 0.5]);
    // x = m / (sqrt(v) + 1): 3.5 / 6, -3.5 / 6, 0.5 / 2, 0
    const w = next.get('w')!;
    assert.equal(w[0], Math.fround(3.5 / 6));
    assert.equal(w[1], Math.fround(-3.5 / 6));
    assert.equal(w[2], 0.25);
    assert.equal(w[3], 0);
  });

  test('fedadam second step uses state', () => {
    const first = applyServerOptimizer(
      tensors({ w: [0] }),
      tensors({ w: [7] }),
      undefined,
      ADAM,
    );

    const second = applyServerOptimizer(
      first.weights,
      tensors({ w: [5] }),
      first.state,
      ADAM,
    );

    // m = 0.5 * 3.5 + 0.5 * 5 = 4.25; v = 0.5 * 25 + 0.5 * 25 = 25
    assert.deepEqual(second.state.tensors[0].firstMoment, [4.25]);
    assert.deepEqual(second.state.tensors[0].secondMoment, [25]);
    // x = fround(3.5 / 6) + 4.25 / (5 + 1)
    const expected = Math.fround(Math.fround(3.5 / 6) + 4.25 / 6);
    assert.equal(second.weights.get('w')![0], expected);
  });

  test('fedyogi second moment sign cases', () => {
    const config: ServerOptimizerConfig = { ...ADAM, optimizer: 'fedyogi' };

    const { weights: next, state } = applyServerOptimizer(
      tensors({ w: [0, 0, 0] }),
      tensors({ w: [4, 0.5, 1] }),
      undefined,
      config,
    );

    const v = state.tensors[0].secondMoment;
    // d^2 = 16 > v = 1, sign(1 - 16) = -1: v = 1 + 0.5 * 16 = 9
    assert.equal(v[0], 9);
    // d^2 = 0.25 < v = 1, sign(0.75) = 1: v = 1 - 0.5 * 0.25 = 0.875
    assert.equal(v[1], 0.875);
    // d^2 = v = 1, sign(0) = 0: v stays 1
    assert.equal(v[2], 1);
    // x = m / (sqrt(v) + 1) with m = 0.5 * 4 = 2: 2 / (3 + 1)
    assert.equal(next.get('w')![0], 0.5);
  });

  test('fedyogi shrinks v less than fedadam', () => {
    const delta = tensors({ w: [0.5] });

    const yogi = applyServerOptimizer(tensors({ w: [0] }), delta, undefined, {
      ...ADAM,
      optimizer: 'fedyogi',
    });
    const adam = applyServerOptimizer(
      tensors({ w: [0] }),
      delta,
      undefined,
      ADAM,
    );

    // yogi: 1 - 0.5 * 0.25 = 0.875; adam: 0.5 * 1 + 0.5 * 0.25 = 0.625
    assert.deepEqual(yogi.state.tensors[0].secondMoment, [0.875]);
    assert.deepEqual(adam.state.tensors[0].secondMoment, [0.625]);
  });

  test('fedadagrad accumulates squared deltas', () => {
    const config: ServerOptimizerConfig = {
      optimizer: 'fedadagrad',
      serverLearningRate: 1,
      beta1: 0.5,
      tau: 1,
      initialSecondMoment: 0,
    };

    const first = applyServerOptimizer(
      tensors({ w: [0] }),
      tensors({ w: [3] }),
      undefined,
      config,
    );
    const second = applyServerOptimizer(
      first.weights,
      tensors({ w: [4] }),
      first.state,
      config,
    );

    // step 1: m = 1.5, v = 0 + 9 = 9, x = 1.5 / (3 + 1) = 0.375
    assert.deepEqual(first.state.tensors[0].secondMoment, [9]);
    assert.equal(first.weights.get('w')![0], 0.375);
    // step 2: m = 0.75 + 2 = 2.75, v = 9 + 16 = 25, x += 2.75 / (5 + 1)
    assert.deepEqual(second.state.tensors[0].firstMoment, [2.75]);
    assert.deepEqual(second.state.tensors[0].secondMoment, [25]);
    assert.equal(second.weights.get('w')![0], Math.fround(0.375 + 2.75 / 6));
  });

  test('fedadagrad default v is tau squared', () => {
    const { weights: next, state } = applyServerOptimizer(
      tensors({ w: [0] }),
      tensors({ w: [0.375] }),
      undefined,
      { optimizer: 'fedadagrad', serverLearningRate: 1, beta1: 0, tau: 0.5 },
    );

    // v = 0.25 + 0.140625 = 0.390625 = 0.625^2; x = 0.375 / (0.625 + 0.5)
    assert.deepEqual(state.tensors[0].secondMoment, [0.390625]);
    assert.equal(next.get('w')![0], Math.fround(1 / 3));
  });
});

describe('server optimizer state', () => {
  test('state survives json round trip', () => {
    const weights = tensors({
      'dense2/bias': [0.1, -0.3],
      'dense2/kernel': [1],
    });
    const config: ServerOptimizerConfig = { ...ADAM, optimizer: 'fedyogi' };
    const first = applyServerOptimizer(
      weights,
      tensors({ 'dense2/bias': [1 / 3, 0.7], 'dense2/kernel': [-0.01] }),
      undefined,
      config,
    );
    const nextDelta = tensors({
      'dense2/bias': [0.2, -0.9],
      'dense2/kernel': [0.05],
    });

    const restored = parseServerOptimizerState(
      JSON.parse(JSON.stringify(first.state)),
    );
    const fromMemory = applyServerOptimizer(
      first.weights,
      nextDelta,
      first.state,
      config,
    );
    const fromJson = applyServerOptimizer(
      first.weights,
      nextDelta,
      restored,
      config,
    );

    assert.deepEqual(restored, first.state);
    assert.deepEqual(fromJson.state, fromMemory.state);
    for (const name of ['dense2/bias', 'dense2/kernel']) {
      assert.deepEqual(
        fromJson.weights.get(name),
        fromMemory.weights.get(name),
      );
    }
  });

  test('parse rejects malformed state', () => {
    const good: ServerOptimizerState = {
      format: 1,
      optimizer: 'fedadam',
      step: 1,
      tensors: [{ name: 'w', firstMoment: [1], secondMoment: [2] }],
    };
    const bad: unknown[] = [
      null,
      { ...good, format: 2 },
      { ...good, optimizer: 'sgd' },
      { ...good, step: -1 },
      { ...good, tensors: 'w' },
      {
        ...good,
        tensors: [{ name: 'w', firstMoment: [null], secondMoment: [2] }],
      },
      { ...good, tensors: [{ name: 'w', firstMoment: [1], secondMoment: [] }] },
      { ...good, tensors: [{ firstMoment: [1], secondMoment: [2] }] },
    ];

    assert.deepEqual(parseServerOptimizerState(good), good);
    for (const value of bad) {
      assert.throws(
        () => parseServerOptimizerState(value),
        isFleetError(ErrorCode.InvalidConfig),
        JSON.stringify(value),
      );
    }
  });

  test('state of other optimizer rejected', () => {
    const { state } = applyServerOptimizer(
      tensors({ w: [0] }),
      tensors({ w: [1] }),
      undefined,
      ADAM,
    );

    assert.throws(
      () =>
        applyServerOptimizer(tensors({ w: [0] }), tensors({ w: [1] }), state, {
          ...ADAM,
          optimizer: 'fedyogi',
        }),
      isFleetError(ErrorCode.InvalidConfig),
    );
  });

  test('state of other tensors rejected', () => {
    const { state } = applyServerOptimizer(
      tensors({ w: [0, 0] }),
      tensors({ w: [1, 1] }),
      undefined,
      ADAM,
    );

    // another tensor name
    assert.throws(
      () =>
        applyServerOptimizer(
          tensors({ v: [0, 0] }),
          tensors({ v: [1, 1] }),
          state,
          ADAM,
        ),
      isFleetError(ErrorCode.InvalidConfig),
    );
    // same name, another size
    assert.throws(
      () =>
        applyServerOptimizer(
          tensors({ w: [0] }),
          tensors({ w: [1] }),
          state,
          ADAM,
        ),
      isFleetError(ErrorCode.InvalidConfig),
    );
  });
});

describe('applyServerOptimizer checks', () => {
  test('non-finite delta rejected', () => {
    for (const value of [NaN, Infinity, -Infinity]) {
      assert.throws(
        () =>
          applyServerOptimizer(
            tensors({ w: [0, 0] }),
            tensors({ w: [1, value] }),
            undefined,
            ADAM,
          ),
        isFleetError(ErrorCode.NonFiniteValue),
      );
    }
  });

  test('float32 overflow rejected', () => {
    assert.throws(
      () =>
        applyServerOptimizer(
          tensors({ w: [3e38] }),
          tensors({ w: [3e38] }),
          undefined,
          {
            optimizer: 'fedavgm',
            serverLearningRate: 1,
            momentum: 0,
          },
        ),
      isFleetError(ErrorCode.NonFiniteValue),
    );
  });

  test('bad config values rejected', () => {
    const weights = tensors({ w: [0] });
    const delta = tensors({ w: [1] });
    const bad: ServerOptimizerConfig[] = [
      { ...ADAM, serverLearningRate: 0 },
      { ...ADAM, serverLearningRate: NaN },
      { ...ADAM, beta1: 1 },
      { ...ADAM, beta2: -0.1 },
      { ...ADAM, tau: 0 },
      { ...ADAM, initialSecondMoment: -1 },
      { optimizer: 'fedavgm', serverLearningRate: 1, momentum: 1 },
    ];

    for (const config of bad) {
      assert.throws(
        () => applyServerOptimizer(weights, delta, undefined, config),
        RangeError,
        JSON.stringify(config),
      );
    }
  });

  test('delta layout checked against weights', () => {
    // unknown tensor, wrong size, no tensors
    assert.throws(
      () =>
        applyServerOptimizer(
          tensors({ w: [0] }),
          tensors({ v: [1] }),
          undefined,
          ADAM,
        ),
      RangeError,
    );
    assert.throws(
      () =>
        applyServerOptimizer(
          tensors({ w: [0] }),
          tensors({ w: [1, 2] }),
          undefined,
          ADAM,
        ),
      RangeError,
    );
    assert.throws(
      () =>
        applyServerOptimizer(tensors({ w: [0] }), new Map(), undefined, ADAM),
      RangeError,
    );
  });

  test('inputs left unchanged', () => {
    const weights = tensors({ w: [1, 2], frozen: [9] });
    const delta = tensors({ w: [0.5, 0.25] });
    const first = applyServerOptimizer(weights, delta, undefined, ADAM);
    const stateCopy = structuredClone(first.state);

    const second = applyServerOptimizer(weights, delta, first.state, ADAM);

    assert.deepEqual([...weights.get('w')!], [1, 2]);
    assert.deepEqual([...delta.get('w')!], [0.5, 0.25]);
    assert.deepEqual(first.state, stateCopy);
    // tensors without a delta are shared, not copied
    assert.equal(second.weights.get('frozen'), weights.get('frozen'));
    assert.notEqual(second.weights.get('w'), weights.get('w'));
  });
});
