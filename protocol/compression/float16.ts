/**
 * IEEE 754 binary16 (float16) conversion, written out because Node 20 has
 * no Float16Array. Conversion rounds to nearest, ties to even, as IEEE 754
 * prescribes for format conversion.
 */
import { ErrorCode, FleetError } from '../errors.ts';

/** Largest finite float16 value. */
export const FLOAT16_MAX = 65504;

const scratch = new DataView(new ArrayBuffer(4));

/**
 * Returns the float16 bit pattern nearest to `value` (after rounding it to
 * float32). Values at or above 65520 in magnitude become infinity, values
 * below 2^-25 become a signed zero, and NaN becomes the quiet NaN 0x7e00
 * with its sign.
 */
export function toFloat16Bits(value: number): number {
  scratch.setFloat32(0, value);
  const bits = scratch.getUint32(0);
  const sign = (bits >>> 16) & 0x8000;
  const exponent = (bits >>> 23) & 0xff;
  const mantissa = bits & 0x7fffff;

  if (exponent === 0xff) return sign | (mantissa === 0 ? 0x7c00 : 0x7e00);
  // Exponent in float16's bias of 15; 0 and below is the subnormal range.
  const halfExponent = exponent - 127 + 15;
  if (halfExponent >= 0x1f) return sign | 0x7c00;
  if (halfExponent <= 0) return sign | roundSubnormal(mantissa, halfExponent);

  let half = (halfExponent << 10) | (mantissa >>> 13);
  const dropped = mantissa & 0x1fff;
  // A carry out of the mantissa moves into the exponent, which is exactly
  // the next float16 value, up to infinity.
  if (dropped > 0x1000 || (dropped === 0x1000 && (half & 1) === 1)) half += 1;
  return sign | half;
}

/** Float16 subnormal mantissa (or the smallest normal, on carry). */
function roundSubnormal(mantissa: number, halfExponent: number): number {
  if (halfExponent < -10) return 0;
  const full = mantissa | 0x800000;
  const shift = 14 - halfExponent;
  const kept = full >>> shift;
  const dropped = full & ((1 << shift) - 1);
  const halfway = 1 << (shift - 1);
  const roundsUp =
    dropped > halfway || (dropped === halfway && (kept & 1) === 1);
  return roundsUp ? kept + 1 : kept;
}

/** Returns the number that the float16 bit pattern `bits` encodes. */
export function fromFloat16Bits(bits: number): number {
  const sign = (bits & 0x8000) === 0 ? 1 : -1;
  const exponent = (bits >>> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa === 0 ? sign * Infinity : Number.NaN;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

/**
 * Encodes finite `values` as little-endian float16, two bytes each.
 *
 * @throws {FleetError} NON_FINITE_VALUE for NaN or infinity, and
 *   VALUE_OUT_OF_RANGE for a value that rounds to infinity (|value| >=
 *   65520), naming the tensor.
 */
export function encodeFloat16(name: string, values: Float32Array): Uint8Array {
  const data = new Uint8Array(values.length * 2);
  const view = new DataView(data.buffer);
  for (let i = 0; i < values.length; i++) {
    const value = values[i];
    if (!Number.isFinite(value)) {
      throw new FleetError(
        ErrorCode.NonFiniteValue,
        `tensor ${name} has value ${value} at index ${i}; float16 ` +
          'encodes finite numbers only',
      );
    }
    const bits = toFloat16Bits(value);
    if ((bits & 0x7fff) === 0x7c00) {
      throw new FleetError(
        ErrorCode.ValueOutOfRange,
        `tensor ${name} has value ${value} at index ${i}, beyond the ` +
          `float16 maximum of ${FLOAT16_MAX}`,
      );
    }
    view.setUint16(i * 2, bits, true);
  }
  return data;
}

/**
 * Decodes little-endian float16 `data` of `count` elements. Infinity and
 * NaN pass through; the caller's value checks reject them.
 *
 * @throws {FleetError} WRONG_SHAPE when `data` is not 2 x `count` bytes.
 */
export function decodeFloat16(
  name: string,
  data: Uint8Array,
  count: number,
): Float32Array {
  if (data.byteLength !== count * 2) {
    throw new FleetError(
      ErrorCode.WrongShape,
      `float16 tensor ${name} has ${data.byteLength} bytes, but its ` +
        `${count} elements need ${count * 2}`,
    );
  }
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const values = new Float32Array(count);
  for (let i = 0; i < count; i++) {
    values[i] = fromFloat16Bits(view.getUint16(i * 2, true));
  }
  return values;
}
