import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { validateUpdate, type RoundContext } from '../aggregator/validate.ts';
import { MODEL_NAME } from '../models/architecture.ts';
import { createRandom } from '../models/random.ts';
import {
  ErrorCode,
  encodeFloat32Tensor,
  encodeModelUpdate,
  encodeSignedUpdate,
  readPublicKeys,
} from '../protocol/index.ts';
import {
  createKeyFolder,
  type KeyFolder,
  type TestKey,
} from './signing-fixtures.ts';

const SHAPES = new Map<string, number[]>([
  ['dense2/kernel', [128, 43]],
  ['dense2/bias', [43]],
]);
const KNOWN_CODES = new Set<string>(Object.values(ErrorCode));
const PAYLOADS_PER_KIND = 5000;

const context: RoundContext = {
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
};

function validPayload(): Uint8Array {
  return encodeModelUpdate(validUpdate());
}

function validUpdate() {
  const deltas = [...SHAPES].map(([name, shape]) => {
    const values = new Float32Array(shape.reduce((a, b) => a * b, 1));
    values.fill(0.25);
    return encodeFloat32Tensor(name, shape, values);
  });
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
  };
}

/**
 * Mutates a copy of `payload`: flips, overwrites, deletes or inserts bytes,
 * or truncates, at random places.
 */
function mutate(payload: Uint8Array, random: () => number): Uint8Array {
  const bytes = Array.from(payload);
  const edits = 1 + Math.floor(random() * 8);
  for (let edit = 0; edit < edits; edit++) {
    const at = Math.floor(random() * bytes.length);
    const kind = Math.floor(random() * 5);
    if (kind === 0) bytes[at] ^= 1 << Math.floor(random() * 8);
    else if (kind === 1) bytes[at] = Math.floor(random() * 256);
    else if (kind === 2) bytes.splice(at, 1 + Math.floor(random() * 16));
    else if (kind === 3) bytes.splice(at, 0, Math.floor(random() * 256));
    else bytes.length = at;
  }
  return Uint8Array.from(bytes);
}

describe('ingress fuzzing', () => {
  test('random payloads all rejected', () => {
    const random = createRandom(11);
    const codes = new Map<string, number>();

    for (let i = 0; i < PAYLOADS_PER_KIND; i++) {
      const length = Math.floor(random() * 2048);
      const payload = Uint8Array.from({ length }, () =>
        Math.floor(random() * 256),
      );
      const decision = validateUpdate('veh-1', payload, context);

      assert.equal(decision.accepted, false, `random payload ${i} accepted`);
      if (!decision.accepted) {
        assert.ok(
          KNOWN_CODES.has(decision.code),
          `unknown code ${decision.code}`,
        );
        codes.set(decision.code, (codes.get(decision.code) ?? 0) + 1);
      }
    }

    assert.ok(codes.size >= 1);
  });

  test('mutated payloads never throw', () => {
    const random = createRandom(12);
    const valid = validPayload();
    let rejected = 0;

    for (let i = 0; i < PAYLOADS_PER_KIND; i++) {
      const decision = validateUpdate('veh-1', mutate(valid, random), context);

      if (decision.accepted) {
        // A flip inside the float data can leave a well-formed update;
        // then every value must still pass the checks.
        for (const values of decision.deltas.values()) {
          for (const value of values) {
            assert.ok(Number.isFinite(value), `payload ${i} value ${value}`);
            assert.ok(Math.abs(value) <= 10, `payload ${i} value ${value}`);
          }
        }
      } else {
        assert.ok(
          KNOWN_CODES.has(decision.code),
          `unknown code ${decision.code}`,
        );
        rejected += 1;
      }
    }

    assert.ok(rejected > PAYLOADS_PER_KIND / 2, `only ${rejected} rejected`);
  });
});

describe('ingress fuzzing with signing', () => {
  let keys: KeyFolder;
  let vehicleKey: TestKey;
  let signedContext: RoundContext;

  before(() => {
    keys = createKeyFolder();
    vehicleKey = keys.createKey('veh-1');
    keys.writePublicKeys('veh-1.json', [vehicleKey], 'veh-1');
    signedContext = { ...context, vehicleKeys: readPublicKeys(keys.dir) };
  });

  after(() => keys.remove());

  test('mutated signed payloads all rejected', () => {
    const random = createRandom(13);
    const signed = encodeSignedUpdate(
      vehicleKey.signer.envelope('update', validPayload()),
    );
    const codes = new Map<string, number>();

    for (let i = 0; i < PAYLOADS_PER_KIND; i++) {
      const mutated = mutate(signed, random);
      const decision = validateUpdate('veh-1', mutated, signedContext);

      // Every byte of the envelope is signed, framing or the key id, so no
      // edit may pass. An edit that leaves the payload unchanged is skipped.
      if (Buffer.compare(mutated, signed) === 0) continue;
      assert.equal(decision.accepted, false, `mutated payload ${i} accepted`);
      if (!decision.accepted) {
        assert.ok(KNOWN_CODES.has(decision.code), `code ${decision.code}`);
        codes.set(decision.code, (codes.get(decision.code) ?? 0) + 1);
      }
    }

    assert.ok((codes.get(ErrorCode.InvalidSignature) ?? 0) > 0);
    assert.ok((codes.get(ErrorCode.MalformedPayload) ?? 0) > 0);
  });

  test('mutated updates signed genuinely checked', () => {
    const random = createRandom(14);
    const valid = validPayload();
    let rejected = 0;

    for (let i = 0; i < PAYLOADS_PER_KIND; i++) {
      // The vehicle's own key signs malformed content: the checks behind
      // the signature must still hold.
      const payload = encodeSignedUpdate(
        vehicleKey.signer.envelope('update', mutate(valid, random)),
      );
      const decision = validateUpdate('veh-1', payload, signedContext);

      if (decision.accepted) {
        for (const values of decision.deltas.values()) {
          for (const value of values) {
            assert.ok(Number.isFinite(value), `payload ${i} value ${value}`);
            assert.ok(Math.abs(value) <= 10, `payload ${i} value ${value}`);
          }
        }
      } else {
        assert.ok(KNOWN_CODES.has(decision.code), `code ${decision.code}`);
        assert.notEqual(decision.code, ErrorCode.InvalidSignature);
        rejected += 1;
      }
    }

    assert.ok(rejected > PAYLOADS_PER_KIND / 2, `only ${rejected} rejected`);
  });
});
