/**
 * The pieces secure rounds over MQTT are built from: the wire encoding,
 * the masked vector, the per-round configuration and the options.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { fileURLToPath } from 'node:url';

import { InvalidArgumentError } from 'commander';
import protobuf from 'protobufjs';

import {
  resolveSecureAggregation,
  secureConfigFor,
  thresholdFor,
} from '../aggregator/secure-options.ts';
import { CompressionKind } from '../protocol/compression/index.ts';
import { secureAggregationOfFlags } from '../protocol/cli-arguments.ts';
import { ErrorCode, type SecureAggregationConfig } from '../protocol/index.ts';
import {
  buildSecureVector,
  checkSecureSum,
  splitSecureSum,
  weightOf,
} from '../secure-aggregation/update-vector.ts';
import { SecAggVehicle } from '../secure-aggregation/vehicle.ts';
import {
  decodeFromVehicle,
  decodeToVehicle,
  encodeFromVehicle,
  encodeToVehicle,
  secureRoundId,
} from '../secure-aggregation/wire.ts';

const FLEET = 'wire-fleet';
const ROUND_ID = secureRoundId(FLEET, 3, 1000);
const ref = { round: 3, roundOpenedAtMs: 1000 };
const MAX = 1 << 20;

function configOf(
  overrides: Partial<SecureAggregationConfig> = {},
): SecureAggregationConfig {
  return {
    threshold: 2,
    clipNorm: 10,
    exampleCap: 10,
    maxVehicles: 4,
    tensorNames: ['a', 'b'],
    ...overrides,
  };
}

function hasCode(code: string) {
  return (err: unknown) => (err as { code?: string }).code === code;
}

describe('secure aggregation wire', () => {
  test('every vehicle message survives encoding', () => {
    const vehicles = ['v1', 'v2', 'v3'].map(
      (id) =>
        new SecAggVehicle({ vehicleId: id, roundId: ROUND_ID, threshold: 2 }),
    );
    const advertisements = vehicles.map((v) => v.advertiseKeys());
    const keysBack = decodeFromVehicle(
      encodeFromVehicle(
        {
          ...ref,
          vehicleId: 'v1',
          body: { kind: 'keys', advertisement: advertisements[0] },
        },
        MAX,
      ),
      FLEET,
    );
    assert.deepEqual(keysBack.body, {
      kind: 'keys',
      advertisement: { ...advertisements[0] },
    });
    assert.equal(keysBack.round, 3);
    assert.equal(keysBack.roundOpenedAtMs, 1000);

    const shares = vehicles[0].shareKeys(advertisements);
    const sharesBack = decodeFromVehicle(
      encodeFromVehicle(
        { ...ref, vehicleId: 'v1', body: { kind: 'shares', shares } },
        MAX,
      ),
      FLEET,
    );
    assert.deepEqual(sharesBack.body, { kind: 'shares', shares });

    const words = Uint32Array.from([0, 1, 0xffffffff, 0x12345678]);
    const input = { roundId: ROUND_ID, vehicleId: 'v1', maskedWords: words };
    const inputBack = decodeFromVehicle(
      encodeFromVehicle(
        { ...ref, vehicleId: 'v1', body: { kind: 'masked-input', input } },
        MAX,
      ),
      FLEET,
    );
    assert.deepEqual(inputBack.body, { kind: 'masked-input', input });

    const response = {
      roundId: ROUND_ID,
      vehicleId: 'v1',
      selfMaskShares: [{ ownerId: 'v2', share: { x: 1, y: 2n ** 500n + 7n } }],
      maskKeyShares: [{ ownerId: 'v3', share: { x: 1, y: 0n } }],
    };
    const responseBack = decodeFromVehicle(
      encodeFromVehicle(
        {
          ...ref,
          vehicleId: 'v1',
          body: { kind: 'unmask-response', response },
        },
        MAX,
      ),
      FLEET,
    );
    assert.deepEqual(responseBack.body, { kind: 'unmask-response', response });
  });

  test('every aggregator message survives encoding', () => {
    const vehicle = new SecAggVehicle({
      vehicleId: 'v1',
      roundId: ROUND_ID,
      threshold: 2,
    });
    const advertisements = [vehicle.advertiseKeys()];
    const request = {
      roundId: ROUND_ID,
      survivorIds: ['v1', 'v2'],
      droppedIds: ['v3'],
    };
    for (const body of [
      { kind: 'key-list' as const, advertisements },
      { kind: 'routed-shares' as const, shares: [] },
      { kind: 'unmask-request' as const, request },
    ]) {
      const back = decodeToVehicle(
        encodeToVehicle({ ...ref, body }, MAX),
        FLEET,
      );
      assert.deepEqual(back, { ...ref, body });
    }
  });

  test('garbage bytes are MALFORMED_PAYLOAD', () => {
    const garbage = Uint8Array.from([0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert.throws(
      () => decodeFromVehicle(garbage, FLEET),
      hasCode(ErrorCode.MalformedPayload),
    );
    assert.throws(
      () => decodeToVehicle(garbage, FLEET),
      hasCode(ErrorCode.MalformedPayload),
    );
  });

  test('message without a body is rejected', () => {
    const empty = encodeToVehicle(
      { ...ref, body: { kind: 'routed-shares', shares: [] } },
      MAX,
    ).subarray(0, 2);
    assert.throws(
      () => decodeToVehicle(empty, FLEET),
      /SecAggToVehicle has no body/,
    );
  });

  test('masked input of 5 bytes is rejected', () => {
    const root = protobuf.loadSync(
      fileURLToPath(
        new URL('../protocol/secure_aggregation_v1.proto', import.meta.url),
      ),
    );
    const type = root.lookupType('fleetlearn.v1.SecAggFromVehicle');
    const bytes = type
      .encode(
        type.fromObject({
          ...ref,
          vehicleId: 'v1',
          maskedInput: { maskedWords: new Uint8Array(5) },
        }),
      )
      .finish();
    assert.throws(
      () => decodeFromVehicle(bytes, FLEET),
      /masked input has 5 bytes; expected a multiple of 4/,
    );
  });

  test('revealed share at x = 0 is rejected', () => {
    const response = {
      roundId: ROUND_ID,
      vehicleId: 'v1',
      selfMaskShares: [{ ownerId: 'v2', share: { x: 0, y: 1n } }],
      maskKeyShares: [],
    };
    const bytes = encodeFromVehicle(
      { ...ref, vehicleId: 'v1', body: { kind: 'unmask-response', response } },
      MAX,
    );
    assert.throws(
      () => decodeFromVehicle(bytes, FLEET),
      /revealed share x is 0; expected an integer >= 1/,
    );
  });

  test('message above the size limit is not encoded', () => {
    assert.throws(
      () =>
        encodeFromVehicle(
          {
            ...ref,
            vehicleId: 'v1',
            body: {
              kind: 'masked-input',
              input: {
                roundId: ROUND_ID,
                vehicleId: 'v1',
                maskedWords: new Uint32Array(100),
              },
            },
          },
          64,
        ),
      hasCode(ErrorCode.PayloadTooLarge),
    );
  });
});

describe('secure vector', () => {
  test('weights and appends the weight, by hand', () => {
    const deltas = new Map([
      ['a', Float32Array.from([3])],
      ['b', Float32Array.from([4, 0])],
    ]);
    const vector = buildSecureVector(deltas, 5, configOf());
    assert.deepEqual([...vector.values], [1.5, 2, 0, 0.5]);
    assert.equal(vector.norm, 5);
    assert.equal(vector.clipped, false);
    assert.equal(vector.weight, 0.5);
  });

  test('clips to the norm before weighting', () => {
    const deltas = new Map([
      ['a', Float32Array.from([3])],
      ['b', Float32Array.from([4, 0])],
    ]);
    const vector = buildSecureVector(deltas, 20, configOf({ clipNorm: 1 }));
    assert.equal(vector.clipped, true);
    assert.equal(vector.weight, 1, 'weight caps at 1');
    assert.ok(Math.abs(vector.values[0] - 0.6) < 1e-5);
    assert.ok(Math.abs(vector.values[1] - 0.8) < 1e-5);
    assert.ok(Math.hypot(vector.values[0], vector.values[1]) < 1);
  });

  test('equal weights without an example cap', () => {
    assert.equal(weightOf(7, configOf({ exampleCap: 0 })), 1);
  });

  test('NaN delta is rejected', () => {
    const deltas = new Map([
      ['a', Float32Array.from([Number.NaN])],
      ['b', Float32Array.from([0, 0])],
    ]);
    assert.throws(
      () => buildSecureVector(deltas, 1, configOf()),
      hasCode(ErrorCode.NonFiniteValue),
    );
  });

  test('missing tensor is rejected', () => {
    const deltas = new Map([['a', Float32Array.from([1])]]);
    assert.throws(
      () => buildSecureVector(deltas, 1, configOf()),
      hasCode(ErrorCode.WrongTensors),
    );
  });

  test('zero examples are rejected', () => {
    const deltas = new Map([
      ['a', Float32Array.from([1])],
      ['b', Float32Array.from([0, 0])],
    ]);
    assert.throws(
      () => buildSecureVector(deltas, 0, configOf()),
      hasCode(ErrorCode.InvalidExampleCount),
    );
  });

  test('sum splits into the weighted mean, by hand', () => {
    const sum = Float64Array.from([2, 4, 6, 2]);
    const tensors = [
      { name: 'a', size: 1 },
      { name: 'b', size: 2 },
    ];
    const { deltas, weightSum } = splitSecureSum(sum, tensors, true);
    assert.equal(weightSum, 2);
    assert.deepEqual([...deltas.get('a')!], [1]);
    assert.deepEqual([...deltas.get('b')!], [2, 3]);
    const plain = splitSecureSum(sum, tensors, false);
    assert.deepEqual([...plain.deltas.get('b')!], [4, 6]);
  });

  test('zero total weight is EMPTY_AGGREGATE', () => {
    assert.throws(
      () => splitSecureSum(new Float64Array(2), [{ name: 'a', size: 1 }], true),
      hasCode(ErrorCode.EmptyAggregate),
    );
  });
});

describe('secure sum check', () => {
  const step = 1e-6;

  test('sum of honest vectors passes', () => {
    // Two vehicles: weights 0.5 and 1, deltas of norm 5 under C = 10.
    const sum = Float64Array.from([1.5 + 3, 2 + 4, 0.5 + 1]);
    assert.doesNotThrow(() =>
      checkSecureSum(sum, configOf({ tensorNames: ['a'] }), 2, step),
    );
  });

  test('weight above one per survivor is rejected', () => {
    const sum = Float64Array.from([0, 0, 2.5]);
    assert.throws(
      () => checkSecureSum(sum, configOf(), 2, step),
      hasCode(ErrorCode.ValueOutOfRange),
    );
  });

  test('negative weight sum is rejected', () => {
    const sum = Float64Array.from([0, 0, -0.1]);
    assert.throws(
      () => checkSecureSum(sum, configOf(), 2, step),
      hasCode(ErrorCode.ValueOutOfRange),
    );
  });

  test('equal weights must sum to the count', () => {
    const sum = Float64Array.from([0, 0, 1.5]);
    assert.throws(
      () => checkSecureSum(sum, configOf({ exampleCap: 0 }), 2, step),
      hasCode(ErrorCode.ValueOutOfRange),
    );
  });

  test('sum longer than weight times C is rejected', () => {
    // Total weight 1.5 allows a norm of 15; this one is 50.
    const sum = Float64Array.from([30, 40, 1.5]);
    assert.throws(
      () => checkSecureSum(sum, configOf(), 2, step),
      hasCode(ErrorCode.UpdateNormTooLarge),
    );
  });
});

describe('secure round configuration', () => {
  const fedavg = { aggregation: 'fedavg', minUpdates: 2 };

  test('threshold is a majority, at least 2', () => {
    assert.equal(thresholdFor(10, { thresholdFraction: 0.5 }), 6);
    assert.equal(thresholdFor(3, { thresholdFraction: 0 }), 2);
  });

  test('example cap is the largest reported count', () => {
    const settings = resolveSecureAggregation({}, fedavg);
    const counts = new Map([
      ['v1', 30],
      ['v2', 50],
    ]);
    const config = secureConfigFor(
      ['v1', 'v2', 'v3'],
      settings,
      ['a'],
      (id) => counts.get(id),
      1000,
    );
    assert.equal(config.exampleCap, 50);
    assert.equal(config.maxVehicles, 3);
    assert.equal(config.threshold, 2);
    const none = secureConfigFor(
      ['v3'],
      settings,
      ['a'],
      () => undefined,
      1000,
    );
    assert.equal(none.exampleCap, 1000);
  });

  test('DP uses its clip norm and equal weights', () => {
    const dp = {
      clipNorm: 0.5,
      noiseMultiplier: 1,
      targetEpsilon: 10,
      delta: 1e-5,
      seed: 1,
      noiseSource: 'seeded' as const,
    };
    const settings = resolveSecureAggregation(
      {},
      { ...fedavg, differentialPrivacy: dp },
    );
    assert.equal(settings.clipNorm, 0.5);
    const config = secureConfigFor(['v1'], settings, ['a'], () => 40, 1000);
    assert.equal(config.exampleCap, 0);
    // A second, different clip norm would be silently ignored.
    assert.throws(
      () =>
        resolveSecureAggregation(
          { clipNorm: 10 },
          { ...fedavg, differentialPrivacy: dp },
        ),
      /clipNorm is 10, expected no value with differential privacy/,
    );
  });

  test('robust rule is rejected', () => {
    assert.throws(
      () => resolveSecureAggregation({}, { ...fedavg, aggregation: 'krum' }),
      /needs aggregation fedavg, got krum/,
    );
  });

  test('quorum of 1 is rejected', () => {
    assert.throws(
      () => resolveSecureAggregation({}, { ...fedavg, minUpdates: 1 }),
      /minUpdates is 1, expected at least 2/,
    );
  });

  test('compressed updates are rejected', () => {
    assert.throws(
      () =>
        resolveSecureAggregation(
          {},
          { ...fedavg, updateCompression: { kind: CompressionKind.Int8 } },
        ),
      hasCode(ErrorCode.InvalidConfig),
    );
  });

  test('bad values name the option', () => {
    assert.throws(
      () => resolveSecureAggregation({ clipNorm: -1 }, fedavg),
      /secureAggregation.clipNorm is -1, expected a positive number/,
    );
    assert.throws(
      () => resolveSecureAggregation({ thresholdFraction: 1 }, fedavg),
      /thresholdFraction is 1, expected a number in \[0, 1\)/,
    );
    assert.throws(
      () => resolveSecureAggregation({ phaseTimeoutMs: 0.5 }, fedavg),
      /phaseTimeoutMs is 0.5, expected an integer from 1 to 2147483647 ms/,
    );
    // setTimeout would fire at once for a longer delay.
    assert.throws(
      () => resolveSecureAggregation({ phaseTimeoutMs: 2 ** 31 }, fedavg),
      /phaseTimeoutMs is 2147483648/,
    );
  });

  test('--secagg-* flag without --secure-aggregation is rejected', () => {
    assert.throws(
      () => secureAggregationOfFlags({ secaggClipNorm: 2 }),
      (err: unknown) =>
        err instanceof InvalidArgumentError &&
        /need --secure-aggregation/.test(err.message),
    );
    assert.equal(secureAggregationOfFlags({}), undefined);
    assert.deepEqual(
      secureAggregationOfFlags({ secureAggregation: true, secaggClipNorm: 2 }),
      { clipNorm: 2, thresholdFraction: undefined, phaseTimeoutMs: undefined },
    );
  });
});
