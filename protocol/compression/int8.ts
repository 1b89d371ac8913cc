/**
 * Symmetric int8 quantization: element = q * scale with q in [-127, 127]
 * and scale = max |value| / 127, either one scale for the whole tensor or
 * one per output channel. The channel is the last dimension, because
 * TF.js stores dense kernels as [in, out] and conv kernels as
 * [height, width, in, out].
 */
import { ErrorCode, FleetError } from '../errors.ts';

/** Largest |q|; -128 is never produced, so the range is symmetric. */
export const INT8_LEVELS = 127;

/** Quantized tensor as it goes into the Tensor message. */
export interface Int8Quantized {
  /** One signed byte per element. */
  data: Uint8Array;
  /** The tensor's scale; 0 when `channelScales` is set. */
  scale: number;
  /** One scale per index of the last dimension, or empty. */
  channelScales: number[];
}

/**
 * Quantizes `values` of `shape`, rounding to nearest with ties away from
 * zero. With `perChannel` and a rank of at least 2, each index of the last
 * dimension gets its own scale. A rank-1 tensor (a bias) keeps one scale,
 * because a scale per element would cost more bytes than float32.
 *
 * @throws {FleetError} NON_FINITE_VALUE for NaN or infinity.
 */
export function quantizeInt8(
  name: string,
  shape: readonly number[],
  values: Float32Array,
  perChannel: boolean,
): Int8Quantized {
  const isPerChannel = perChannel && shape.length >= 2;
  const channels = isPerChannel ? shape.at(-1)! : 1;
  const maxAbs = new Float64Array(channels);
  for (let i = 0; i < values.length; i++) {
    const value = values[i];
    if (!Number.isFinite(value)) {
      throw new FleetError(
        ErrorCode.NonFiniteValue,
        `tensor ${name} has value ${value} at index ${i}; int8 quantization ` +
          'takes finite numbers only',
      );
    }
    const channel = i % channels;
    maxAbs[channel] = Math.max(maxAbs[channel], Math.abs(value));
  }
  const scales = Array.from(maxAbs, scaleFor);

  const data = new Uint8Array(values.length);
  const signed = new Int8Array(data.buffer);
  for (let i = 0; i < values.length; i++) {
    signed[i] = quantizeToInt8(values[i], scales[i % channels]);
  }
  return isPerChannel
    ? { data, scale: 0, channelScales: scales }
    : { data, scale: scales[0], channelScales: [] };
}

/**
 * Returns the float32 scale for a largest magnitude. An all-zero channel
 * gets scale 1: any positive scale encodes it, and the wire rejects 0.
 */
function scaleFor(maxAbs: number): number {
  const scale = Math.fround(maxAbs / INT8_LEVELS);
  return scale > 0 ? scale : 1;
}

/**
 * Returns value / scale rounded to the nearest integer, ties away from
 * zero, and clamped to [-127, 127].
 */
export function quantizeToInt8(value: number, scale: number): number {
  const scaled = value / scale;
  const rounded = Math.sign(scaled) * Math.floor(Math.abs(scaled) + 0.5);
  // Guards the wire range; the float32 rounding of the scale moves the
  // largest value by at most 2^-24 relative, which still rounds to 127.
  // Adding 0 turns -0 into 0.
  return Math.max(-INT8_LEVELS, Math.min(INT8_LEVELS, rounded)) + 0;
}

/** Fields of an INT8_SCALED Tensor that decoding reads. */
export interface Int8Encoded {
  name: string;
  shape: readonly number[];
  data: Uint8Array;
  scale: number;
  channelScales?: readonly number[];
}

/**
 * Returns q * scale for every element. Any byte value is accepted, -128
 * too.
 *
 * @throws {FleetError} WRONG_SHAPE when the byte count is not the element
 *   count or the channel scales do not match the last dimension, and
 *   MALFORMED_PAYLOAD for a scale that is NaN, infinite, zero or
 *   negative.
 */
export function dequantizeInt8(
  tensor: Int8Encoded,
  count: number,
): Float32Array {
  const { name, data } = tensor;
  if (data.byteLength !== count) {
    throw new FleetError(
      ErrorCode.WrongShape,
      `int8 tensor ${name} has ${data.byteLength} bytes, but its ${count} ` +
        `elements need ${count}`,
    );
  }
  const scales = scalesOf(tensor);
  const signed = new Int8Array(data.buffer, data.byteOffset, data.byteLength);
  const values = new Float32Array(count);
  const channels = scales.length;
  for (let i = 0; i < count; i++) {
    values[i] = signed[i] * scales[i % channels];
  }
  return values;
}

/** Returns the tensor's scales, one or one per channel, checked. */
function scalesOf(tensor: Int8Encoded): readonly number[] {
  const channelScales = tensor.channelScales ?? [];
  const scales = channelScales.length > 0 ? channelScales : [tensor.scale];
  if (channelScales.length > 0) {
    const lastDimension = tensor.shape.at(-1);
    if (channelScales.length !== lastDimension) {
      throw new FleetError(
        ErrorCode.WrongShape,
        `int8 tensor ${tensor.name} has ${channelScales.length} channel ` +
          `scales, but its shape [${tensor.shape.join(', ')}] has ` +
          `${lastDimension ?? 'no'} channels in the last dimension`,
      );
    }
  }
  const bad = scales.findIndex(
    (scale) => !(scale > 0) || !Number.isFinite(scale),
  );
  if (bad >= 0) {
    const scaleName =
      channelScales.length > 0 ? `channel ${bad} scale` : 'scale';
    throw new FleetError(
      ErrorCode.MalformedPayload,
      `int8 tensor ${tensor.name} has ${scaleName} ${scales[bad]}; expected a ` +
        'finite number above 0',
    );
  }
  return scales;
}
