import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { validateUpdate, type RoundContext } from '../aggregator/validate.ts';
import { MODEL_NAME } from '../models/architecture.ts';
import {
  ErrorCode,
  decodeSignedUpdate,
  encodeFloat32Tensor,
  encodeModelUpdate,
  encodeSignedUpdate,
  readPublicKeys,
  type ModelUpdate,
  type PublicKeySet,
} from '../protocol/index.ts';
import {
  createKeyFolder,
  signUpdate,
  type KeyFolder,
  type TestKey,
} from './signing-fixtures.ts';

const SHAPES = new Map<string, number[]>([
  ['dense2/kernel', [128, 43]],
  ['dense2/bias', [43]],
]);

let keys: KeyFolder;
let keyOne: TestKey;
let keyTwo: TestKey;
let strangerKey: TestKey;
let vehicleKeys: PublicKeySet;

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
    vehicleKeys,
    ...overrides,
  };
}

function update(overrides: Partial<ModelUpdate> = {}): ModelUpdate {
  const deltas = [...SHAPES].map(([name, shape]) =>
    encodeFloat32Tensor(
      name,
      shape,
      new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(0.5),
    ),
  );
  return {
    updateId: 'u-1',
    vehicleId: 'veh-1',
    modelName: MODEL_NAME,
    baseModelVersion: 3,
    round: 5,
    numExamples: 12,
    deltas,
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
  topicVehicleId = 'veh-1',
  ctx = context(),
): string {
  const decision = validateUpdate(topicVehicleId, payload, ctx);
  return decision.accepted ? 'ACCEPTED' : decision.code;
}

before(() => {
  keys = createKeyFolder();
  keyOne = keys.createKey('veh-1');
  keyTwo = keys.createKey('veh-2');
  strangerKey = keys.createKey('stranger');
  const folder = keys.dir;
  keys.writePublicKeys('veh-1.json', [keyOne], 'veh-1');
  keys.writePublicKeys('veh-2.json', [keyTwo], 'veh-2');
  vehicleKeys = readPublicKeys(folder);
});

after(() => keys.remove());

describe('signed update validation', () => {
  test('genuine signed update accepted', () => {
    const decision = validateUpdate(
      'veh-1',
      signUpdate(keyOne, update()),
      context(),
    );

    assert.equal(decision.accepted, true);
    assert.equal(decision.update?.updateId, 'u-1');
  });

  test('unsigned update rejected when required', () => {
    assert.equal(codeOf(encodeModelUpdate(update())), ErrorCode.NotSigned);
  });

  test('update tampered after signing rejected', () => {
    const envelope = decodeSignedUpdate(signUpdate(keyOne, update()))!;
    const tampered = encodeModelUpdate(update({ numExamples: 999 }));
    const payload = encodeSignedUpdate({ ...envelope, signedBytes: tampered });

    assert.equal(codeOf(payload), ErrorCode.InvalidSignature);
  });

  test('flipped delta byte rejected', () => {
    const envelope = decodeSignedUpdate(signUpdate(keyOne, update()))!;
    const bytes = Uint8Array.from(envelope.signedBytes);
    bytes[bytes.length >> 1] ^= 0x40;
    const payload = encodeSignedUpdate({ ...envelope, signedBytes: bytes });

    assert.equal(codeOf(payload), ErrorCode.InvalidSignature);
  });

  test('other vehicle key on own topic rejected', () => {
    const forged = signUpdate(keyTwo, update({ vehicleId: 'veh-1' }));

    assert.equal(codeOf(forged, 'veh-1'), ErrorCode.SignerMismatch);
  });

  test('own key naming other vehicle rejected', () => {
    const forged = signUpdate(keyOne, update({ vehicleId: 'veh-2' }));

    assert.equal(codeOf(forged, 'veh-1'), ErrorCode.SignerMismatch);
  });

  test('genuine update on other topic rejected', () => {
    const genuine = signUpdate(keyTwo, update({ vehicleId: 'veh-2' }));

    assert.equal(codeOf(genuine, 'veh-1'), ErrorCode.SignerMismatch);
  });

  test('unregistered key rejected', () => {
    const forged = signUpdate(strangerKey, update());

    assert.equal(codeOf(forged), ErrorCode.UnknownKey);
  });

  test('signature checked before round', () => {
    const late = signUpdate(strangerKey, update({ round: 4 }));

    assert.equal(codeOf(late), ErrorCode.UnknownKey);
  });

  test('without keys signed update unwrapped', () => {
    const ctx = context({ vehicleKeys: undefined });

    assert.equal(
      codeOf(signUpdate(strangerKey, update()), 'veh-1', ctx),
      'ACCEPTED',
    );
    assert.equal(codeOf(encodeModelUpdate(update()), 'veh-1', ctx), 'ACCEPTED');
  });

  test('without keys topic mismatch unchanged', () => {
    const ctx = context({ vehicleKeys: undefined });

    assert.equal(
      codeOf(encodeModelUpdate(update()), 'veh-2', ctx),
      ErrorCode.MalformedPayload,
    );
  });
});
