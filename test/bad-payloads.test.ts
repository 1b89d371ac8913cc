import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { validateUpdate, type RoundContext } from '../aggregator/index.ts';
import {
  MODEL_NAME,
  TENSOR_SPECS,
  tensorNamesOfLayers,
} from '../models/index.ts';
import {
  ErrorCode,
  countElements,
  decodeModelUpdate,
  encodeFloat32Tensor,
  encodeModelUpdate,
} from '../protocol/index.ts';
import { buildBadPayload } from '../scripts/sim/bad-payloads.ts';
import { PAYLOAD_FAULT_KINDS } from '../scripts/sim/faults.ts';

const TRAINED = tensorNamesOfLayers(['dense1', 'dense2']);
const SPECS = TENSOR_SPECS.filter((spec) => TRAINED.includes(spec.name));

/** Encodes a genuine update of veh-001 for round 4, as an agent would. */
function genuineUpdate(): Uint8Array {
  return encodeModelUpdate({
    updateId: '6f1c2a7e-0000-4000-8000-000000000001',
    vehicleId: 'veh-001',
    modelName: MODEL_NAME,
    baseModelVersion: 3,
    round: 4,
    numExamples: 120,
    deltas: SPECS.map((spec) => {
      const values = new Float32Array(countElements(spec.shape));
      for (let i = 0; i < values.length; i++) values[i] = ((i % 7) - 3) / 1000;
      return encodeFloat32Tensor(spec.name, spec.shape, values);
    }),
    metrics: {
      trainLoss: 0.5,
      trainAccuracy: 0.8,
      trainDurationMs: 40,
      backend: 'wasm',
    },
    createdAtMs: 1_700_000_000_000,
  });
}

/** Returns the context of open round 4, which the genuine update belongs to. */
function roundContext(): RoundContext {
  return {
    openRound: 4,
    lastRound: 4,
    modelName: MODEL_NAME,
    modelVersion: 3,
    selectedVehicles: new Set(['veh-001', 'veh-002']),
    seenUpdateIds: new Set(),
    earlierAccepted: new Map(),
    acceptedVehicles: new Set(),
    acceptedExamples: 0,
    trainableShapes: new Map(SPECS.map((spec) => [spec.name, spec.shape])),
    maxMessageBytes: 64 * 1024 * 1024,
    maxExamplesPerUpdate: 1_000_000,
    maxAbsDeltaValue: 1000,
  };
}

describe('buildBadPayload', () => {
  const genuine = genuineUpdate();

  test('genuine update is accepted', () => {
    const decision = validateUpdate('veh-001', genuine, roundContext());

    assert.equal(decision.accepted, true);
  });

  for (const kind of PAYLOAD_FAULT_KINDS) {
    test(`${kind} rejected with expected code`, () => {
      for (let seed = 1; seed <= 20; seed++) {
        const bad = buildBadPayload(kind, genuine, seed);

        const decision = validateUpdate('veh-001', bad.payload, roundContext());

        assert.equal(decision.accepted, false, `seed ${seed}`);
        assert.equal(
          (decision as { code: string }).code,
          bad.expectedCode,
          `seed ${seed}`,
        );
        assert.equal(bad.kind, kind);
      }
    });
  }

  test('decodable payloads carry fresh ids', () => {
    for (const kind of ['nan', 'wrong-shape'] as const) {
      const bad = buildBadPayload(kind, genuine, 7);

      const decoded = decodeModelUpdate(bad.payload);

      assert.equal(decoded.updateId, bad.updateId);
      assert.notEqual(decoded.updateId, decodeModelUpdate(genuine).updateId);
      assert.equal(decoded.vehicleId, 'veh-001');
      assert.equal(decoded.round, 4);
    }
  });

  test('undecodable payloads have no id', () => {
    for (const kind of ['truncated', 'corrupt'] as const) {
      const bad = buildBadPayload(kind, genuine, 3);

      assert.equal(bad.updateId, undefined);
      assert.throws(() => decodeModelUpdate(bad.payload), {
        name: 'FleetError',
        code: ErrorCode.MalformedPayload,
      });
    }
  });

  test('same seed gives same bytes', () => {
    for (const kind of PAYLOAD_FAULT_KINDS) {
      const first = buildBadPayload(kind, genuine, 11);
      const second = buildBadPayload(kind, genuine, 11);

      assert.deepEqual(first.payload, second.payload, kind);
    }
  });
});
