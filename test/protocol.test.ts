import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import Long from 'long';
import {
  AckStatus,
  ErrorCode,
  FleetError,
  FleetTopics,
  TensorEncoding,
  decodeModelRelease,
  decodeModelUpdate,
  decodeRoundTask,
  decodeTensorValues,
  decodeUpdateAck,
  encodeFloat32Tensor,
  encodeModelRelease,
  encodeModelUpdate,
  encodeRoundTask,
  encodeUpdateAck,
  toSafeInteger,
  type ModelUpdate,
} from '../protocol/index.ts';

function sampleUpdate(): ModelUpdate {
  return {
    updateId: 'upd-1',
    vehicleId: 'veh-001',
    modelName: 'gtsrb-cnn',
    baseModelVersion: 4,
    round: 7,
    numExamples: 321,
    deltas: [
      encodeFloat32Tensor('dense2/bias', [3], new Float32Array([0.5, -1, 2])),
    ],
    metrics: {
      trainLoss: 0.25,
      trainAccuracy: 0.5,
      trainDurationMs: 1200,
      backend: 'wasm',
    },
    createdAtMs: 1_764_000_000_000,
  };
}

function assertFleetError(fn: () => unknown, code: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof FleetError, `expected FleetError, got ${err}`);
    assert.equal(err.code, code);
    return true;
  });
}

describe('model update codec', () => {
  it('round trips every field', () => {
    const update = sampleUpdate();

    const decoded = decodeModelUpdate(encodeModelUpdate(update));

    assert.equal(decoded.updateId, 'upd-1');
    assert.equal(decoded.vehicleId, 'veh-001');
    assert.equal(decoded.baseModelVersion, 4);
    assert.equal(decoded.round, 7);
    assert.equal(decoded.numExamples, 321);
    assert.equal(decoded.createdAtMs, 1_764_000_000_000);
    assert.equal(decoded.metrics.backend, 'wasm');
    assert.deepEqual(decoded.deltas[0].shape, [3]);
    assert.equal(decoded.deltas[0].encoding, TensorEncoding.Float32);
    assert.deepEqual(
      Array.from(decodeTensorValues(decoded.deltas[0])),
      [0.5, -1, 2],
    );
  });

  it('rejects every truncation', () => {
    const bytes = encodeModelUpdate(sampleUpdate());

    for (let length = 0; length < bytes.length; length++) {
      assert.throws(
        () => decodeModelUpdate(bytes.subarray(0, length)),
        (err: unknown) =>
          err instanceof FleetError && err.code === ErrorCode.MalformedPayload,
        `truncation to ${length} bytes`,
      );
    }
  });

  it('rejects random bytes with a code', () => {
    let seed = 12345;
    const next = () => (seed = (seed * 1103515245 + 12345) >>> 0) & 0xff;

    for (let trial = 0; trial < 500; trial++) {
      const bytes = Uint8Array.from({ length: 1 + (trial % 97) }, next);
      try {
        decodeModelUpdate(bytes);
        assert.fail('random bytes decoded as an update');
      } catch (err) {
        assert.ok(err instanceof FleetError, `trial ${trial}: ${err}`);
        assert.equal(err.code, ErrorCode.MalformedPayload);
      }
    }
  });

  it('rejects an update without ids', () => {
    const update = { ...sampleUpdate(), vehicleId: '' };

    assertFleetError(
      () => decodeModelUpdate(encodeModelUpdate(update)),
      ErrorCode.MalformedPayload,
    );
  });

  it('enforces the size limit before sending', () => {
    assertFleetError(
      () => encodeModelUpdate(sampleUpdate(), 16),
      ErrorCode.PayloadTooLarge,
    );
  });
});

describe('64-bit fields', () => {
  it('converts Long, string and number', () => {
    assert.equal(toSafeInteger('f', Long.fromNumber(2 ** 40, true)), 2 ** 40);
    assert.equal(toSafeInteger('f', '12'), 12);
    assert.equal(toSafeInteger('f', 7), 7);
  });

  it('rejects values above 2^53 - 1', () => {
    const tooBig = Long.fromString('9007199254740993', true);

    assertFleetError(
      () => toSafeInteger('f', tooBig),
      ErrorCode.MalformedPayload,
    );
  });

  it('decodes a huge example count as an error', () => {
    const update = { ...sampleUpdate(), numExamples: 0 };
    const bytes = encodeModelUpdate(update);
    // Field 6 (num_examples), varint wire type, value 2^60.
    const huge = Uint8Array.from([...bytes, 0x30, ...varint(2n ** 60n)]);

    assertFleetError(() => decodeModelUpdate(huge), ErrorCode.MalformedPayload);
  });
});

function varint(value: bigint): number[] {
  const out: number[] = [];
  while (value >= 0x80n) {
    out.push(Number((value & 0x7fn) | 0x80n));
    value >>= 7n;
  }
  out.push(Number(value));
  return out;
}

describe('tensor values', () => {
  it('copies bytes at an odd offset', () => {
    const wire = encodeFloat32Tensor('t', [2], new Float32Array([1.5, -2.5]));
    const shifted = new Uint8Array(wire.data.byteLength + 1);
    shifted.set(wire.data, 1);

    const values = decodeTensorValues({ ...wire, data: shifted.subarray(1) });

    assert.deepEqual(Array.from(values), [1.5, -2.5]);
    assert.equal(values.byteOffset % 4, 0);
  });

  it('rejects a byte count off the shape', () => {
    const wire = encodeFloat32Tensor('t', [2], new Float32Array([1, 2]));

    assertFleetError(
      () => decodeTensorValues({ ...wire, shape: [3] }),
      ErrorCode.WrongShape,
    );
  });

  it('rejects an unsupported encoding', () => {
    const wire = encodeFloat32Tensor('t', [2], new Float32Array([1, 2]));

    assertFleetError(
      () =>
        decodeTensorValues({ ...wire, encoding: TensorEncoding.Int8Scaled }),
      ErrorCode.UnsupportedEncoding,
    );
  });

  it('rejects values that do not fit the shape', () => {
    assert.throws(
      () => encodeFloat32Tensor('t', [3], new Float32Array(2)),
      RangeError,
    );
  });
});

describe('other messages', () => {
  it('round task keeps its training config', () => {
    const bytes = encodeRoundTask({
      fleetId: 'fleet-a',
      round: 3,
      modelName: 'gtsrb-cnn',
      modelVersion: 2,
      selectedVehicles: ['veh-1', 'veh-2'],
      training: {
        localEpochs: 2,
        batchSize: 32,
        learningRate: 0.001,
        proximalMu: 0.01,
        trainableTensors: ['dense2/kernel', 'dense2/bias'],
        restrictToLocalClasses: true,
      },
      openedAtMs: 1000,
      deadlineMs: 61000,
      minUpdates: 2,
      modelSha256: 'ab'.repeat(32),
    });

    const task = decodeRoundTask(bytes);

    assert.equal(task.deadlineMs, 61000);
    assert.deepEqual(task.selectedVehicles, ['veh-1', 'veh-2']);
    assert.equal(task.training.localEpochs, 2);
    assert.equal(task.training.restrictToLocalClasses, true);
    assert.deepEqual(task.training.trainableTensors, [
      'dense2/kernel',
      'dense2/bias',
    ]);
  });

  it('round task without training config fails', () => {
    const bytes = encodeRoundTask({
      fleetId: 'fleet-a',
      modelName: 'gtsrb-cnn',
    } as never);

    assertFleetError(() => decodeRoundTask(bytes), ErrorCode.MalformedPayload);
  });

  it('ack carries reason and current round', () => {
    const ack = decodeUpdateAck(
      encodeUpdateAck({
        updateId: 'u',
        round: 3,
        status: AckStatus.Rejected,
        reasonCode: ErrorCode.WrongRound,
        reason: 'round 3 is closed',
        currentRound: 4,
        currentModelVersion: 3,
      }),
    );

    assert.equal(ack.status, AckStatus.Rejected);
    assert.equal(ack.reasonCode, 'WRONG_ROUND');
    assert.equal(ack.currentRound, 4);
  });

  it('release notice keeps chunk digests', () => {
    const digests = ['ab'.repeat(32), 'cd'.repeat(32)];

    const release = decodeModelRelease(
      encodeModelRelease({
        modelName: 'gtsrb-cnn',
        version: 1,
        parentVersion: 0,
        round: 1,
        sha256: 'ef'.repeat(32),
        sizeBytes: 7,
        createdAtMs: 5,
        testAccuracy: 0.9,
        numVehicles: 3,
        numExamples: 400,
        chunkSizeBytes: 4,
        chunkCount: 2,
        chunkSha256: digests,
      }),
    );

    assert.deepEqual(release.chunkSha256, digests);
    assert.equal(release.chunkCount, 2);
    assert.equal(release.chunkSizeBytes, 4);
    assert.equal(release.sizeBytes, 7);
    assert.equal(release.numExamples, 400);
  });
});

describe('topics', () => {
  it('builds and parses vehicle topics', () => {
    const topics = new FleetTopics('fleet-a');

    const topic = topics.update('veh-9');

    assert.equal(topic, 'fleet/v1/fleet-a/vehicles/veh-9/updates');
    assert.equal(topics.vehicleIdOf(topic), 'veh-9');
    assert.equal(
      topics.vehicleIdOf('fleet/v1/other/vehicles/x/updates'),
      undefined,
    );
  });

  it('rejects wildcards in ids', () => {
    const topics = new FleetTopics('fleet-a');

    for (const bad of ['', 'a/b', 'a+', '#', 'x'.repeat(129)]) {
      assert.throws(() => topics.update(bad), RangeError, JSON.stringify(bad));
    }
  });
});
