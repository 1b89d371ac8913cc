/**
 * Shamir secret sharing over the prime field of the Mersenne prime
 * p = 2^521 - 1, with BigInt arithmetic. Any 32-byte secret (an X25519
 * private key, a mask seed) is below p, so it encodes as one field element
 * without reduction. Each recipient gets the value at its x of a random
 * polynomial of degree threshold - 1 whose constant term is the secret.
 * Any `threshold` points give the secret back by Lagrange interpolation at
 * 0, and fewer give no information about it.
 */
import { randomBytes } from 'node:crypto';

/** The field modulus, the Mersenne prime 2^521 - 1. */
export const FIELD_PRIME = 2n ** 521n - 1n;

/** Bytes of a big-endian field element: ceil(521 / 8). */
export const FIELD_ELEMENT_BYTES = 66;

/** One point (x, f(x)) of the sharing polynomial. */
export interface ShamirShare {
  /** Evaluation point, an integer in [1, 2^32 - 1]; never 0. */
  x: number;
  /** f(x) modulo FIELD_PRIME. */
  y: bigint;
}

/** Draws a uniform field element by rejection sampling 521 random bits. */
function randomFieldElement(): bigint {
  for (;;) {
    const bytes = randomBytes(FIELD_ELEMENT_BYTES);
    bytes[0] &= 0x01; // keep 521 bits
    const value = BigInt('0x' + bytes.toString('hex'));
    if (value < FIELD_PRIME) return value;
  }
}

function mod(value: bigint): bigint {
  const r = value % FIELD_PRIME;
  return r < 0n ? r + FIELD_PRIME : r;
}

/** Inverse modulo FIELD_PRIME by the extended Euclidean algorithm. */
function invert(value: bigint): bigint {
  let [oldR, r] = [mod(value), FIELD_PRIME];
  let [oldS, s] = [1n, 0n];
  while (r !== 0n) {
    const q = oldR / r;
    [oldR, r] = [r, oldR - q * r];
    [oldS, s] = [s, oldS - q * s];
  }
  if (oldR !== 1n) throw new RangeError(`${value} has no inverse mod p`);
  return mod(oldS);
}

function checkPoints(xs: readonly number[]): void {
  const seen = new Set<number>();
  for (const x of xs) {
    if (!Number.isInteger(x) || x < 1 || x > 0xffffffff) {
      throw new RangeError(
        `share point x is ${x}; expected an integer in [1, 2^32 - 1]`,
      );
    }
    if (seen.has(x)) {
      throw new RangeError(`share point x = ${x} appears twice`);
    }
    seen.add(x);
  }
}

/**
 * Splits `secret` into one share per point in `xs`, any `threshold` of
 * which reconstruct it.
 *
 * @throws RangeError when the secret is not a field element, a point is
 *   invalid or repeated, or threshold is not in [1, xs.length].
 */
export function splitSecret(
  secret: bigint,
  threshold: number,
  xs: readonly number[],
): ShamirShare[] {
  if (secret < 0n || secret >= FIELD_PRIME) {
    throw new RangeError('secret is outside the field [0, 2^521 - 1)');
  }
  if (!Number.isInteger(threshold) || threshold < 1 || threshold > xs.length) {
    throw new RangeError(
      `threshold is ${threshold}; expected an integer in [1, ${xs.length}]`,
    );
  }
  checkPoints(xs);

  const coefficients = [secret];
  for (let i = 1; i < threshold; i++) coefficients.push(randomFieldElement());

  return xs.map((x) => {
    const point = BigInt(x);
    let y = 0n;
    for (let i = coefficients.length - 1; i >= 0; i--) {
      y = mod(y * point + coefficients[i]);
    }
    return { x, y };
  });
}

/**
 * Reconstructs the secret from the first `threshold` of `shares` by
 * Lagrange interpolation at x = 0. Wrong shares give a wrong secret without
 * an error, so callers check the result where they can.
 *
 * @throws RangeError when fewer than threshold shares are given or their
 *   points are invalid or repeated.
 */
export function combineShares(
  shares: readonly ShamirShare[],
  threshold: number,
): bigint {
  if (!Number.isInteger(threshold) || threshold < 1) {
    throw new RangeError(
      `threshold is ${threshold}; expected a positive integer`,
    );
  }
  if (shares.length < threshold) {
    throw new RangeError(
      `${shares.length} shares given; reconstruction needs ${threshold}`,
    );
  }
  const used = shares.slice(0, threshold);
  checkPoints(used.map((share) => share.x));

  let secret = 0n;
  for (let i = 0; i < used.length; i++) {
    const xi = BigInt(used[i].x);
    let numerator = 1n;
    let denominator = 1n;
    for (let j = 0; j < used.length; j++) {
      if (j === i) continue;
      const xj = BigInt(used[j].x);
      numerator = mod(numerator * xj);
      denominator = mod(denominator * (xj - xi));
    }
    secret = mod(secret + used[i].y * numerator * invert(denominator));
  }
  return secret;
}

/** Reads big-endian bytes as a field element. */
export function bytesToFieldElement(bytes: Uint8Array): bigint {
  if (bytes.length === 0) return 0n;
  const value = BigInt('0x' + Buffer.from(bytes).toString('hex'));
  if (value >= FIELD_PRIME) {
    throw new RangeError('bytes encode a value outside the field');
  }
  return value;
}

/**
 * Writes a field element as `length` big-endian bytes.
 *
 * @throws RangeError when the value is negative or needs more bytes.
 */
export function fieldElementToBytes(value: bigint, length: number): Uint8Array {
  if (value < 0n || value >= 1n << BigInt(8 * length)) {
    throw new RangeError(`field element does not fit in ${length} bytes`);
  }
  const hex = value.toString(16).padStart(2 * length, '0');
  return new Uint8Array(Buffer.from(hex, 'hex'));
}
