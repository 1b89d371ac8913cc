import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  CompressionKind,
  decodeDeltaValues,
  decodeFloat16,
  decodeTopK,
  dequantizeInt8,
  encodeDeltaTensor,
  encodeFloat16,
  encodeTopK,
  fromFloat16Bits,
  quantizeInt8,
  quantizeToInt8,
  selectTopK,
  toFloat16Bits,
  topkCount,
  type CompressedWireTensor,
  type UpdateCompression,
} from '../protocol/compression/index.ts';
import {
  ErrorCode,
  FleetError,
  TensorEncoding,
  decodeModelUpdate,
  encodeModelUpdate,
  type ModelUpdate,
} from '../protocol/index.ts';

function assertFleetError(run: () => unknown, code: ErrorCode): void {
  assert.throws(run, (err: unknown) => {
    assert.ok(err instanceof FleetError, `expected FleetError, got ${err}`);
    assert.equal(err.code, code);
    return true;
  });
}

describe('float16 conversion', () => {
  test('exact values encode exactly', () => {
    const cases: Array<[number, number]> = [
      [0, 0x0000],
      [-0, 0x8000],
      [1, 0x3c00],
      [-2, 0xc000],
      [0.5, 0x3800],
      [65504, 0x7bff],
      [2 ** -14, 0x0400],
    ];
    for (const [value, bits] of cases) {
      assert.equal(toFloat16Bits(value), bits, `value ${value}`);
      assert.equal(fromFloat16Bits(bits), value, `bits ${bits}`);
    }
  });

  test('rounding ties go to even', () => {
    // 1 + 2^-11 lies halfway between 1 (0x3c00, even) and 1 + 2^-10.
    assert.equal(toFloat16Bits(1 + 2 ** -11), 0x3c00);
    // 1 + 3 * 2^-11 lies halfway between 0x3c01 (odd) and 0x3c02.
    assert.equal(toFloat16Bits(1 + 3 * 2 ** -11), 0x3c02);
    // Just above halfway rounds up.
    assert.equal(toFloat16Bits(1 + 2 ** -11 + 2 ** -20), 0x3c01);
    // 1/3 is 0x3555 in float16 (0.333251953125).
    assert.equal(toFloat16Bits(1 / 3), 0x3555);
    assert.equal(fromFloat16Bits(0x3555), 0.333251953125);
  });

  test('subnormals round to nearest even', () => {
    assert.equal(toFloat16Bits(2 ** -24), 0x0001);
    assert.equal(toFloat16Bits(-(2 ** -24)), 0x8001);
    assert.equal(toFloat16Bits(2 ** -25), 0x0000);
    assert.equal(toFloat16Bits(1.5 * 2 ** -25), 0x0001);
    assert.equal(toFloat16Bits(3 * 2 ** -25), 0x0002);
    assert.equal(toFloat16Bits(1023 * 2 ** -24), 0x03ff);
    // The largest subnormal plus half a step carries into the exponent.
    assert.equal(toFloat16Bits(1023.5 * 2 ** -24), 0x0400);
    assert.equal(toFloat16Bits(2 ** -30), 0x0000);
    assert.equal(fromFloat16Bits(0x0001), 2 ** -24);
    assert.equal(fromFloat16Bits(0x03ff), 1023 * 2 ** -24);
  });

  test('overflow, infinity and nan', () => {
    assert.equal(toFloat16Bits(65519), 0x7bff);
    assert.equal(toFloat16Bits(65520), 0x7c00);
    assert.equal(toFloat16Bits(1e10), 0x7c00);
    assert.equal(toFloat16Bits(Infinity), 0x7c00);
    assert.equal(toFloat16Bits(-Infinity), 0xfc00);
    assert.equal(toFloat16Bits(Number.NaN), 0x7e00);
    assert.equal(fromFloat16Bits(0x7c00), Infinity);
    assert.equal(fromFloat16Bits(0xfc00), -Infinity);
    assert.ok(Number.isNaN(fromFloat16Bits(0x7e00)));
    assert.ok(Number.isNaN(fromFloat16Bits(0xfc01)));
  });

  test('encode writes little-endian pairs', () => {
    const data = encodeFloat16('t', new Float32Array([1, -2]));

    assert.deepEqual([...data], [0x00, 0x3c, 0x00, 0xc0]);
    assert.deepEqual([...decodeFloat16('t', data, 2)], [1, -2]);
  });

  test('encode rejects nan and overflow', () => {
    assertFleetError(
      () => encodeFloat16('t', new Float32Array([1, Number.NaN])),
      ErrorCode.NonFiniteValue,
    );
    assertFleetError(
      () => encodeFloat16('t', new Float32Array([70_000])),
      ErrorCode.ValueOutOfRange,
    );
  });

  test('decode rejects wrong byte count', () => {
    assertFleetError(
      () => decodeFloat16('t', new Uint8Array(5), 3),
      ErrorCode.WrongShape,
    );
    assertFleetError(
      () => decodeFloat16('t', new Uint8Array(8), 3),
      ErrorCode.WrongShape,
    );
  });

  test('decode passes infinity through', () => {
    const data = Uint8Array.from([0x00, 0x7c]);

    assert.equal(decodeFloat16('t', data, 1)[0], Infinity);
  });
});

describe('int8 quantization', () => {
  test('per-tensor scale and rounding', () => {
    const values = new Float32Array([127, -63.5, 0.49, -0.5, 2.5]);

    const quantized = quantizeInt8('t', [5], values, false);

    assert.equal(quantized.scale, 1);
    assert.deepEqual(quantized.channelScales, []);
    assert.deepEqual(
      [...new Int8Array(quantized.data.buffer)],
      [127, -64, 0, -1, 3],
    );
  });

  test('scale is max magnitude over 127', () => {
    const values = new Float32Array([0.5, -2, 1]);

    const { scale, data } = quantizeInt8('t', [3], values, false);

    assert.equal(scale, Math.fround(2 / 127));
    assert.deepEqual([...new Int8Array(data.buffer)], [32, -127, 64]);
  });

  test('clamping keeps q within 127', () => {
    assert.equal(quantizeToInt8(200, 1), 127);
    assert.equal(quantizeToInt8(-300, 1), -127);
    assert.equal(quantizeToInt8(127.4, 1), 127);
    assert.equal(quantizeToInt8(-0.4, 1), 0);
  });

  test('all-zero tensor gets scale 1', () => {
    const { scale, data } = quantizeInt8('t', [4], new Float32Array(4), false);

    assert.equal(scale, 1);
    assert.deepEqual([...data], [0, 0, 0, 0]);
  });

  test('per-channel on dense layout', () => {
    // [in = 3, out = 2]: channel 0 is column 0, channel 1 column 1.
    const values = new Float32Array([1, 10, -127, 254, 2.5, -3]);

    const quantized = quantizeInt8('dense', [3, 2], values, true);

    assert.equal(quantized.scale, 0);
    assert.deepEqual(quantized.channelScales, [1, 2]);
    assert.deepEqual(
      [...new Int8Array(quantized.data.buffer)],
      [1, 5, -127, 127, 3, -2],
    );
  });

  test('per-channel on conv kernel layout', () => {
    // [height 2, width 2, in 1, out 3]: element i belongs to channel i % 3.
    const values = new Float32Array([
      127, 2, 0, -1, -254, 0, 0.5, 4, 0, 63.5, 100, 0,
    ]);

    const quantized = quantizeInt8('conv', [2, 2, 1, 3], values, true);

    assert.deepEqual(quantized.channelScales, [1, 2, 1]);
    assert.deepEqual(
      [...new Int8Array(quantized.data.buffer)],
      [127, 1, 0, -1, -127, 0, 1, 2, 0, 64, 50, 0],
    );
    const decoded = dequantizeInt8(
      { name: 'conv', shape: [2, 2, 1, 3], ...quantized },
      12,
    );
    assert.deepEqual(
      [...decoded],
      [127, 2, 0, -1, -254, 0, 1, 4, 0, 64, 100, 0],
    );
  });

  test('per-channel keeps one scale for rank 1', () => {
    const quantized = quantizeInt8('bias', [2], new Float32Array([1, 2]), true);

    assert.deepEqual(quantized.channelScales, []);
    assert.equal(quantized.scale, Math.fround(2 / 127));
  });

  test('dequantize accepts -128', () => {
    const data = Uint8Array.from([0x80, 0x7f]);

    const values = dequantizeInt8(
      { name: 't', shape: [2], data, scale: 0.5 },
      2,
    );

    assert.deepEqual([...values], [-64, 63.5]);
  });

  test('dequantize rejects wrong byte count', () => {
    const tensor = { name: 't', shape: [3], data: new Uint8Array(2), scale: 1 };

    assertFleetError(() => dequantizeInt8(tensor, 3), ErrorCode.WrongShape);
  });

  test('dequantize rejects bad scales', () => {
    for (const scale of [Number.NaN, 0, -1, Infinity]) {
      const tensor = { name: 't', shape: [2], data: new Uint8Array(2), scale };
      assertFleetError(
        () => dequantizeInt8(tensor, 2),
        ErrorCode.MalformedPayload,
      );
    }
  });

  test('dequantize rejects bad channel scales', () => {
    const base = {
      name: 't',
      shape: [2, 2],
      data: new Uint8Array(4),
      scale: 0,
    };

    assertFleetError(
      () => dequantizeInt8({ ...base, channelScales: [1, 1, 1] }, 4),
      ErrorCode.WrongShape,
    );
    assertFleetError(
      () => dequantizeInt8({ ...base, channelScales: [1, Number.NaN] }, 4),
      ErrorCode.MalformedPayload,
    );
    assertFleetError(
      () => dequantizeInt8({ ...base, channelScales: [0, 1] }, 4),
      ErrorCode.MalformedPayload,
    );
    assertFleetError(
      () => dequantizeInt8({ ...base, channelScales: [1, -2] }, 4),
      ErrorCode.MalformedPayload,
    );
  });

  test('quantize rejects nan', () => {
    assertFleetError(
      () => quantizeInt8('t', [2], new Float32Array([1, Number.NaN]), false),
      ErrorCode.NonFiniteValue,
    );
  });
});

describe('top-k sparsification', () => {
  test('count rounds density up', () => {
    assert.equal(topkCount(131_072, 0.01), 1311);
    assert.equal(topkCount(100, 0.07), 7);
    assert.equal(topkCount(43, 0.01), 1);
    assert.equal(topkCount(10, 1), 10);
    assert.equal(topkCount(5, 0.0001), 1);
    assert.equal(topkCount(0, 0.5), 0);
  });

  test('selection breaks ties by position', () => {
    const values = new Float32Array([0.1, -3, 2, 3, -2, 0.5]);

    assert.deepEqual([...selectTopK(values, 3)], [1, 2, 3]);
    assert.deepEqual([...selectTopK(values, 4)], [1, 2, 3, 4]);
    assert.deepEqual([...selectTopK(values, 1)], [1]);
  });

  test('selection of all equal values', () => {
    const values = new Float32Array([1, -1, 1, -1]);

    assert.deepEqual([...selectTopK(values, 2)], [0, 1]);
    assert.deepEqual([...selectTopK(values, 9)], [0, 1, 2, 3]);
  });

  test('encode writes sorted indices and values', () => {
    const values = new Float32Array([0, 5, 0, -7, 1]);

    const encoded = encodeTopK('t', values, 2);

    assert.deepEqual(encoded.indices, [1, 3]);
    const view = new DataView(encoded.data.buffer);
    assert.equal(view.getFloat32(0, true), 5);
    assert.equal(view.getFloat32(4, true), -7);
    assert.deepEqual([...decodeTopK('t', encoded, 5)], [0, 5, 0, -7, 0]);
  });

  test('encode rejects nan', () => {
    assertFleetError(
      () => encodeTopK('t', new Float32Array([1, Number.NaN]), 1),
      ErrorCode.NonFiniteValue,
    );
  });

  test('decode rejects bad indices', () => {
    const data = new Uint8Array(8);
    const cases: Array<[string, number[]]> = [
      ['out of range', [1, 5]],
      ['unsorted', [3, 1]],
      ['duplicated', [2, 2]],
    ];
    for (const [what, indices] of cases) {
      assertFleetError(
        () => decodeTopK(what, { indices, data }, 5),
        ErrorCode.MalformedPayload,
      );
    }
  });

  test('decode rejects wrong byte count', () => {
    assertFleetError(
      () => decodeTopK('t', { indices: [0, 1], data: new Uint8Array(7) }, 5),
      ErrorCode.WrongShape,
    );
  });
});

describe('delta tensors on the wire', () => {
  const shape = [4, 3];
  const values = Float32Array.from({ length: 12 }, (_, i) => (i - 5) / 4);

  function roundTrip(tensor: CompressedWireTensor): CompressedWireTensor {
    const update: ModelUpdate = {
      updateId: 'u',
      vehicleId: 'v',
      modelName: 'm',
      baseModelVersion: 0,
      round: 1,
      numExamples: 1,
      deltas: [tensor],
      metrics: {
        trainLoss: 0,
        trainAccuracy: 0,
        trainDurationMs: 0,
        backend: '',
      },
      createdAtMs: 1,
    };
    return decodeModelUpdate(encodeModelUpdate(update)).deltas[0];
  }

  const kinds: Array<[string, UpdateCompression, number]> = [
    ['float32', { kind: CompressionKind.Float32, topkDensity: 0 }, 0],
    ['float16', { kind: CompressionKind.Float16, topkDensity: 0 }, 1e-3],
    ['int8', { kind: CompressionKind.Int8, topkDensity: 0 }, 1.5 / 127],
    [
      'int8-channel',
      { kind: CompressionKind.Int8Channel, topkDensity: 0 },
      1.5 / 127,
    ],
  ];
  for (const [name, compression, tolerance] of kinds) {
    test(`${name} survives protobuf`, () => {
      const tensor = roundTrip(
        encodeDeltaTensor('t', shape, values, compression),
      );

      const decoded = decodeDeltaValues(tensor);

      assert.equal(decoded.length, 12);
      for (let i = 0; i < 12; i++) {
        assert.ok(
          Math.abs(decoded[i] - values[i]) <= tolerance,
          `element ${i}: ${decoded[i]} vs ${values[i]}`,
        );
      }
    });
  }

  test('int8-channel carries channel scales', () => {
    const compression = { kind: CompressionKind.Int8Channel, topkDensity: 0 };

    const tensor = roundTrip(
      encodeDeltaTensor('t', shape, values, compression),
    );

    assert.equal(tensor.encoding, TensorEncoding.Int8Scaled);
    assert.equal(tensor.channelScales?.length, 3);
    assert.equal(tensor.data.byteLength, 12);
  });

  test('topk survives protobuf', () => {
    const compression = { kind: CompressionKind.TopK, topkDensity: 0.25 };

    const tensor = roundTrip(
      encodeDeltaTensor('t', shape, values, compression),
    );

    assert.equal(tensor.encoding, TensorEncoding.TopkSparse);
    // Magnitudes 1.5 at 11 and 1.25 at 0 and 10 are the three largest.
    assert.deepEqual(tensor.indices, [0, 10, 11]);
    assert.deepEqual(
      [...decodeDeltaValues(tensor)],
      [-1.25, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1.25, 1.5],
    );
  });

  test('unknown encoding rejected', () => {
    const tensor = encodeDeltaTensor('t', [1], new Float32Array(1), {
      kind: CompressionKind.Float32,
      topkDensity: 0,
    });

    assertFleetError(
      () => decodeDeltaValues({ ...tensor, encoding: 9 }),
      ErrorCode.UnsupportedEncoding,
    );
    assertFleetError(
      () =>
        decodeDeltaValues({ ...tensor, encoding: TensorEncoding.Unspecified }),
      ErrorCode.UnsupportedEncoding,
    );
  });
});
