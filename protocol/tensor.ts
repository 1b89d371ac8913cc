import { decodeFloat16, encodeFloat16 } from './compression/float16.ts';
import { dequantizeInt8, quantizeInt8 } from './compression/int8.ts';
import { decodeTopK, encodeTopK, topkCount } from './compression/topk.ts';
import {
  CompressionKind,
  type UpdateCompression,
} from './compression/update-compression.ts';
import { ErrorCode, FleetError } from './errors.ts';
import type { WireTensor } from './messages.ts';
import { TensorEncoding } from './schema.ts';

/**
 * A wire tensor with the per-channel int8 scales, which protobufjs
 * decodes as an array (empty when absent).
 */
export type CompressedWireTensor = WireTensor & { channelScales?: number[] };

/** Number of elements of a tensor with `shape`. */
export function countElements(shape: readonly number[]): number {
  let count = 1;
  for (const dim of shape) count *= dim;
  return count;
}

/**
 * Builds a float32 wire tensor. The bytes are little-endian; on a
 * big-endian host they are swapped.
 */
export function encodeFloat32Tensor(
  name: string,
  shape: readonly number[],
  values: Float32Array,
): WireTensor {
  if (values.length !== countElements(shape)) {
    throw new RangeError(
      `tensor ${name} has ${values.length} values, but shape ` +
        `[${shape.join(', ')}] needs ${countElements(shape)}`,
    );
  }
  const data = new Uint8Array(
    values.buffer,
    values.byteOffset,
    values.byteLength,
  );
  return {
    name,
    shape: [...shape],
    encoding: TensorEncoding.Float32,
    data: IS_LITTLE_ENDIAN ? data : swapBytes32(data),
    scale: 0,
    indices: [],
  };
}

/**
 * Returns the values of a float32 wire tensor. Bytes from a socket can
 * start at any offset, so they are viewed in place when the offset is a
 * multiple of 4 and copied otherwise. Throws UNSUPPORTED_ENCODING for
 * encodings other than float32 and WRONG_SHAPE when the byte count does
 * not match the shape.
 */
export function decodeTensorValues(tensor: WireTensor): Float32Array {
  if (tensor.encoding !== TensorEncoding.Float32) {
    throw new FleetError(
      ErrorCode.UnsupportedEncoding,
      `tensor ${tensor.name} has encoding ${tensor.encoding}, expected ` +
        `${TensorEncoding.Float32} (float32)`,
    );
  }
  const expected = countElements(tensor.shape) * 4;
  if (tensor.data.byteLength !== expected) {
    throw new FleetError(
      ErrorCode.WrongShape,
      `tensor ${tensor.name} has ${tensor.data.byteLength} bytes, but shape ` +
        `[${tensor.shape.join(', ')}] needs ${expected}`,
    );
  }
  let data = tensor.data;
  if (!IS_LITTLE_ENDIAN) data = swapBytes32(data);
  if (data.byteOffset % 4 === 0) {
    return new Float32Array(data.buffer, data.byteOffset, expected / 4);
  }
  // Buffer#slice returns a view, so copy explicitly into a fresh buffer.
  const aligned = new Float32Array(expected / 4);
  new Uint8Array(aligned.buffer).set(data);
  return aligned;
}

const IS_LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

function swapBytes32(data: Uint8Array): Uint8Array {
  const out = new Uint8Array(data.byteLength);
  for (let i = 0; i < data.byteLength; i += 4) {
    out[i] = data[i + 3];
    out[i + 1] = data[i + 2];
    out[i + 2] = data[i + 1];
    out[i + 3] = data[i];
  }
  return out;
}

/**
 * Encodes the delta `values` of one tensor in the encoding of
 * `compression`. The float32 bytes of the Float32Array are shared, not copied.
 *
 * @throws {RangeError} when `values` does not fit `shape`.
 * @throws {FleetError} NON_FINITE_VALUE for NaN or infinity in a
 *   compressed encoding, VALUE_OUT_OF_RANGE for a value beyond float16.
 */
export function encodeDeltaTensor(
  name: string,
  shape: readonly number[],
  values: Float32Array,
  compression: UpdateCompression,
): CompressedWireTensor {
  const float32 = encodeFloat32Tensor(name, shape, values);
  switch (compression.kind) {
    case CompressionKind.Float16:
      return {
        ...float32,
        encoding: TensorEncoding.Float16,
        data: encodeFloat16(name, values),
      };
    case CompressionKind.Int8:
    case CompressionKind.Int8Channel: {
      const perChannel = compression.kind === CompressionKind.Int8Channel;
      const quantized = quantizeInt8(name, shape, values, perChannel);
      return { ...float32, encoding: TensorEncoding.Int8Scaled, ...quantized };
    }
    case CompressionKind.TopK: {
      const k = topkCount(values.length, compression.topkDensity);
      const sparse = encodeTopK(name, values, k);
      return { ...float32, encoding: TensorEncoding.TopkSparse, ...sparse };
    }
    default:
      return float32;
  }
}

/**
 * Returns the float32 values of a tensor in any TensorEncoding, for update
 * deltas. Model weights use decodeTensorValues, which takes float32 only.
 *
 * @throws {FleetError} UNSUPPORTED_ENCODING for an unknown encoding,
 *   WRONG_SHAPE for a byte or scale count off the shape, MALFORMED_PAYLOAD
 *   for a bad int8 scale or top-k index (see dequantizeInt8, decodeTopK).
 */
export function decodeDeltaValues(tensor: CompressedWireTensor): Float32Array {
  const count = countElements(tensor.shape);
  switch (tensor.encoding) {
    case TensorEncoding.Float32:
      return decodeTensorValues(tensor);
    case TensorEncoding.Float16:
      return decodeFloat16(tensor.name, tensor.data, count);
    case TensorEncoding.Int8Scaled:
      return dequantizeInt8(tensor, count);
    case TensorEncoding.TopkSparse:
      return decodeTopK(tensor.name, tensor, count);
    default:
      throw new FleetError(
        ErrorCode.UnsupportedEncoding,
        `tensor ${tensor.name} has encoding ${tensor.encoding}, expected ` +
          'one of 1 (float32), 2 (float16), 3 (int8) and 4 (top-k sparse)',
      );
  }
}
