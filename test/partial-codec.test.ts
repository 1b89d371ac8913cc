import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  ErrorCode,
  TensorEncoding,
  decodePartialAggregate,
  decodeTensorValues,
  encodeFloat32Tensor,
  encodePartialAggregate,
  isFleetError,
  type PartialAggregate,
} from '../protocol/index.ts';

function validPartial(): PartialAggregate {
  return {
    partialId: 'depot-a-r3',
    depotId: 'depot-a',
    modelName: 'gtsrb-cnn',
    baseModelVersion: 2,
    round: 3,
    updates: [
      { vehicleId: 'veh-1', updateId: 'veh-1-r3', numExamples: 10 },
      { vehicleId: 'veh-2', updateId: 'veh-2-r3', numExamples: 5 },
    ],
    numExamples: 15,
    meanDeltas: [
      encodeFloat32Tensor('dense2/bias', [3], new Float32Array([1.5, -2, 0])),
    ],
    createdAtMs: 1_700_000_000_123,
  };
}

function assertMalformed(bytes: Uint8Array, pattern: RegExp): void {
  assert.throws(
    () => decodePartialAggregate(bytes),
    (err: unknown) =>
      isFleetError(err, ErrorCode.MalformedPayload) &&
      pattern.test(err.message),
  );
}

describe('partial aggregate codec', () => {
  test('round trips every field', () => {
    const partial = validPartial();

    const decoded = decodePartialAggregate(encodePartialAggregate(partial));

    assert.equal(decoded.partialId, 'depot-a-r3');
    assert.equal(decoded.depotId, 'depot-a');
    assert.equal(decoded.modelName, 'gtsrb-cnn');
    assert.equal(decoded.baseModelVersion, 2);
    assert.equal(decoded.round, 3);
    assert.deepEqual(decoded.updates, partial.updates);
    assert.equal(decoded.numExamples, 15);
    assert.equal(decoded.createdAtMs, 1_700_000_000_123);
    assert.equal(decoded.meanDeltas.length, 1);
    assert.equal(decoded.meanDeltas[0].name, 'dense2/bias');
    assert.deepEqual(decoded.meanDeltas[0].shape, [3]);
    assert.equal(decoded.meanDeltas[0].encoding, TensorEncoding.Float32);
    assert.deepEqual(
      Array.from(decodeTensorValues(decoded.meanDeltas[0])),
      [1.5, -2, 0],
    );
  });

  test('encode rejects oversized message', () => {
    assert.throws(
      () => encodePartialAggregate(validPartial(), 16),
      (err: unknown) => isFleetError(err, ErrorCode.PayloadTooLarge),
    );
  });

  test('decode rejects unsorted entries', () => {
    const partial = validPartial();
    partial.updates.reverse();

    assertMalformed(encodePartialAggregate(partial), /sorted/);
  });

  test('decode rejects repeated vehicle', () => {
    const partial = validPartial();
    partial.updates[1] = { ...partial.updates[1], vehicleId: 'veh-1' };

    assertMalformed(encodePartialAggregate(partial), /without repeats/);
  });

  test('decode rejects numExamples not the sum', () => {
    const partial = { ...validPartial(), numExamples: 16 };

    assertMalformed(encodePartialAggregate(partial), /numExamples 16/);
  });

  test('decode rejects partial without entries', () => {
    const partial = { ...validPartial(), updates: [], numExamples: 0 };

    assertMalformed(encodePartialAggregate(partial), /0 entries/);
  });

  test('decode rejects truncated payload', () => {
    const bytes = encodePartialAggregate(validPartial());

    assertMalformed(bytes.subarray(0, bytes.length - 20), /decode/);
  });

  test('decode rejects missing createdAtMs', () => {
    const partial = { ...validPartial(), createdAtMs: 0 };

    assertMalformed(encodePartialAggregate(partial), /createdAtMs/);
  });

  test('decode rejects missing depot id', () => {
    const partial = { ...validPartial(), depotId: '' };

    assertMalformed(encodePartialAggregate(partial), /no depotId/);
  });

  test('decode rejects entry without update id', () => {
    const partial = validPartial();
    partial.updates[0] = { ...partial.updates[0], updateId: '' };

    assertMalformed(encodePartialAggregate(partial), /no updateId/);
  });

  test('decode rejects garbage bytes', () => {
    assertMalformed(new Uint8Array([0xff, 0xff, 0xff, 0xff]), /decode/);
  });
});
