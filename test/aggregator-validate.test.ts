import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { validateUpdate, type RoundContext } from '../aggregator/validate.ts';
import {
  ErrorCode,
  TensorEncoding,
  encodeFloat32Tensor,
  encodeModelUpdate,
  type ModelUpdate,
  type WireTensor,
} from '../protocol/index.ts';
import { MODEL_NAME } from '../models/architecture.ts';

const SHAPES = new Map<string, number[]>([
  ['dense2/kernel', [128, 43]],
  ['dense2/bias', [43]],
]);

function context(overrides: Partial<RoundContext> = {}): RoundContext {
  return {
    openRound: 5,
    lastRound: 5,
    modelName: MODEL_NAME,
    modelVersion: 3,
    selectedVehicles: new Set(['veh-1', 'veh-2']),
    seenUpdateIds: new Set(),
    earlierAccepted: new Map(),
    acceptedVehicles: new Set(),
    acceptedExamples: 0,
    trainableShapes: SHAPES,
    maxMessageBytes: 1024 * 1024,
    maxExamplesPerUpdate: 1000,
    maxAbsDeltaValue: 10,
    ...overrides,
  };
}

function tensor(name: string, fill = 0.5): WireTensor {
  const shape = SHAPES.get(name)!;
  const values = new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(fill);
  return encodeFloat32Tensor(name, shape, values);
}

function update(overrides: Partial<ModelUpdate> = {}): ModelUpdate {
  return {
    updateId: 'u-1',
    vehicleId: 'veh-1',
    modelName: MODEL_NAME,
    baseModelVersion: 3,
    round: 5,
    numExamples: 12,
    deltas: [tensor('dense2/kernel'), tensor('dense2/bias')],
    metrics: {
      trainLoss: 1,
      trainAccuracy: 0.5,
      trainDurationMs: 3,
      backend: 'cpu',
    },
    createdAtMs: 1,
    ...overrides,
  };
}

function codeOf(
  payload: Uint8Array,
  ctx = context(),
  topicVehicleId = 'veh-1',
): string {
  const decision = validateUpdate(topicVehicleId, payload, ctx);
  return decision.accepted ? 'ACCEPTED' : decision.code;
}

describe('validateUpdate', () => {
  test('valid update accepted with deltas', () => {
    const decision = validateUpdate(
      'veh-1',
      encodeModelUpdate(update()),
      context(),
    );

    assert.equal(decision.accepted, true);
    assert.ok(decision.accepted);
    assert.equal(decision.deltas.get('dense2/bias')!.length, 43);
    assert.equal(decision.deltas.get('dense2/kernel')![100], 0.5);
    assert.equal(decision.update.numExamples, 12);
  });

  test('truncated bytes are malformed', () => {
    const bytes = encodeModelUpdate(update());

    const code = codeOf(bytes.subarray(0, Math.floor(bytes.length / 2)));

    assert.equal(code, ErrorCode.MalformedPayload);
  });

  test('oversized payload rejected', () => {
    const bytes = encodeModelUpdate(update());

    const code = codeOf(bytes, context({ maxMessageBytes: 1000 }));

    assert.equal(code, ErrorCode.PayloadTooLarge);
  });

  test('topic and payload vehicle differ', () => {
    const bytes = encodeModelUpdate(update());

    assert.equal(codeOf(bytes, context(), 'veh-2'), ErrorCode.MalformedPayload);
  });

  test('round checks name the code', () => {
    const bytes = encodeModelUpdate(update());

    assert.equal(
      codeOf(bytes, context({ openRound: undefined, lastRound: 4 })),
      ErrorCode.WrongRound,
    );
    assert.equal(
      codeOf(bytes, context({ openRound: 6, lastRound: 6 })),
      ErrorCode.RoundClosed,
    );
    assert.equal(
      codeOf(bytes, context({ openRound: undefined, lastRound: 5 })),
      ErrorCode.RoundClosed,
    );
    assert.equal(
      codeOf(encodeModelUpdate(update({ round: 9 }))),
      ErrorCode.WrongRound,
    );
  });

  test('wrong round reason names current', () => {
    const decision = validateUpdate(
      'veh-1',
      encodeModelUpdate(update({ round: 9 })),
      context(),
    );

    assert.equal(decision.accepted, false);
    assert.ok(!decision.accepted);
    assert.match(decision.reason, /current round is 5, model version 3/);
  });

  test('unselected vehicle rejected', () => {
    const bytes = encodeModelUpdate(update({ vehicleId: 'veh-9' }));

    assert.equal(
      codeOf(bytes, context(), 'veh-9'),
      ErrorCode.VehicleNotSelected,
    );
  });

  test('wrong model name or version', () => {
    const otherName = encodeModelUpdate(update({ modelName: 'other-model' }));
    const otherVersion = encodeModelUpdate(update({ baseModelVersion: 2 }));

    assert.equal(codeOf(otherName), ErrorCode.WrongModelVersion);
    assert.equal(codeOf(otherVersion), ErrorCode.WrongModelVersion);
  });

  test('duplicate id or vehicle rejected', () => {
    const bytes = encodeModelUpdate(update());

    assert.equal(
      codeOf(bytes, context({ seenUpdateIds: new Set(['u-1']) })),
      ErrorCode.DuplicateUpdate,
    );
    assert.equal(
      codeOf(bytes, context({ acceptedVehicles: new Set(['veh-1']) })),
      ErrorCode.DuplicateUpdate,
    );
  });

  test('late copy of counted update', () => {
    const bytes = encodeModelUpdate(update({ round: 4 }));
    const decision = validateUpdate(
      'veh-1',
      bytes,
      context({ earlierAccepted: new Map([['u-1', 4]]) }),
    );

    assert.equal(decision.accepted, false);
    assert.equal(
      !decision.accepted && decision.code,
      ErrorCode.DuplicateUpdate,
    );
    assert.match(
      !decision.accepted ? decision.reason : '',
      /update u-1 was already accepted in round 4; current round is 5/,
    );
    assert.equal(codeOf(bytes), ErrorCode.RoundClosed);
  });

  test('zero examples rejected', () => {
    const bytes = encodeModelUpdate(update({ numExamples: 0 }));

    assert.equal(codeOf(bytes), ErrorCode.InvalidExampleCount);
  });

  test('example count above maximum', () => {
    const huge = encodeModelUpdate(
      update({ numExamples: Number.MAX_SAFE_INTEGER }),
    );
    const decision = validateUpdate('veh-1', huge, context());

    assert.ok(!decision.accepted);
    assert.equal(decision.code, ErrorCode.InvalidExampleCount);
    assert.match(decision.reason, /9007199254740991/);
    assert.match(decision.reason, /maximum of 1000/);
    assert.equal(
      codeOf(encodeModelUpdate(update({ numExamples: 1000 }))),
      'ACCEPTED',
    );
    assert.equal(
      codeOf(encodeModelUpdate(update({ numExamples: 1001 }))),
      ErrorCode.InvalidExampleCount,
    );
  });

  test('round example sum stays safe', () => {
    const bytes = encodeModelUpdate(update({ numExamples: 12 }));
    const nearLimit = context({
      acceptedExamples: Number.MAX_SAFE_INTEGER - 5,
      maxExamplesPerUpdate: Number.MAX_SAFE_INTEGER,
    });

    assert.equal(codeOf(bytes, nearLimit), ErrorCode.InvalidExampleCount);
  });

  test('delta magnitude above bound', () => {
    const huge = update({
      deltas: [tensor('dense2/kernel'), tensor('dense2/bias', -3e38)],
    });
    const decision = validateUpdate(
      'veh-1',
      encodeModelUpdate(huge),
      context(),
    );
    const atBound = update({
      deltas: [tensor('dense2/kernel', 10), tensor('dense2/bias', -10)],
    });

    assert.ok(!decision.accepted);
    assert.equal(decision.code, ErrorCode.ValueOutOfRange);
    assert.match(decision.reason, /dense2\/bias/);
    assert.match(decision.reason, /<= 10/);
    assert.equal(codeOf(encodeModelUpdate(atBound)), 'ACCEPTED');
  });

  test('tensor set must match exactly', () => {
    const missing = update({ deltas: [tensor('dense2/kernel')] });
    const repeated = update({
      deltas: [tensor('dense2/kernel'), tensor('dense2/kernel')],
    });
    const extra = update({
      deltas: [
        tensor('dense2/kernel'),
        tensor('dense2/bias'),
        encodeFloat32Tensor('dense1/bias', [128], new Float32Array(128)),
      ],
    });

    assert.equal(codeOf(encodeModelUpdate(missing)), ErrorCode.WrongTensors);
    assert.equal(codeOf(encodeModelUpdate(repeated)), ErrorCode.WrongTensors);
    assert.equal(codeOf(encodeModelUpdate(extra)), ErrorCode.WrongTensors);
  });

  test('wrong shape or byte count', () => {
    const reshaped = encodeFloat32Tensor(
      'dense2/bias',
      [42],
      new Float32Array(42),
    );
    const shortData = { ...tensor('dense2/bias'), data: new Uint8Array(40) };

    const withShape = update({ deltas: [tensor('dense2/kernel'), reshaped] });
    const withBytes = update({ deltas: [tensor('dense2/kernel'), shortData] });

    assert.equal(codeOf(encodeModelUpdate(withShape)), ErrorCode.WrongShape);
    assert.equal(codeOf(encodeModelUpdate(withBytes)), ErrorCode.WrongShape);
  });

  test('float16 encoding unsupported', () => {
    const half = { ...tensor('dense2/bias'), encoding: TensorEncoding.Float16 };

    const bytes = encodeModelUpdate(
      update({ deltas: [tensor('dense2/kernel'), half] }),
    );

    assert.equal(codeOf(bytes), ErrorCode.UnsupportedEncoding);
  });

  test('nan and infinity rejected', () => {
    const nan = update({
      deltas: [tensor('dense2/kernel', Number.NaN), tensor('dense2/bias')],
    });
    const inf = update({
      deltas: [tensor('dense2/kernel'), tensor('dense2/bias', -Infinity)],
    });

    assert.equal(codeOf(encodeModelUpdate(nan)), ErrorCode.NonFiniteValue);
    assert.equal(codeOf(encodeModelUpdate(inf)), ErrorCode.NonFiniteValue);
  });
});
