/**
 * Mask expansion and arithmetic modulo 2^32.
 *
 * The pseudorandom generator is AES-256-CTR keyed with a 32-byte seed, with
 * an all-zero initial counter block, applied to zero bytes: the keystream,
 * read as little-endian 32-bit words, is the mask. A zero counter is safe
 * because every seed comes from HKDF with a label, round and vehicle ids
 * and keys exactly one stream.
 */
import { createCipheriv } from 'node:crypto';
import { endianness } from 'node:os';
import { DERIVED_KEY_BYTES } from './kdf.ts';

const ZERO_COUNTER = Buffer.alloc(16);
const IS_LITTLE_ENDIAN = endianness() === 'LE';

/** Largest mask in words: 2^28 words is 1 GiB of keystream. */
export const MAX_MASK_WORDS = 2 ** 28;

/**
 * Expands `seed` into `length` pseudorandom words. The same seed always
 * gives the same words, and a longer mask starts with the shorter one.
 *
 * @throws RangeError when the seed is not 32 bytes or the length is not an
 *   integer in [0, MAX_MASK_WORDS].
 */
export function expandMask(seed: Uint8Array, length: number): Uint32Array {
  if (seed.length !== DERIVED_KEY_BYTES) {
    throw new RangeError(
      `mask seed is ${seed.length} bytes; expected ${DERIVED_KEY_BYTES}`,
    );
  }
  if (!Number.isInteger(length) || length < 0 || length > MAX_MASK_WORDS) {
    throw new RangeError(
      `mask length is ${length}; expected an integer in [0, ${MAX_MASK_WORDS}]`,
    );
  }

  const cipher = createCipheriv('aes-256-ctr', seed, ZERO_COUNTER);
  const keystream = cipher.update(Buffer.alloc(4 * length));
  const words = new Uint32Array(length);
  if (IS_LITTLE_ENDIAN) {
    new Uint8Array(words.buffer).set(keystream);
  } else {
    const view = new DataView(
      keystream.buffer,
      keystream.byteOffset,
      keystream.byteLength,
    );
    for (let i = 0; i < length; i++) words[i] = view.getUint32(4 * i, true);
  }
  return words;
}

function checkSameLength(target: Uint32Array, words: Uint32Array): void {
  if (target.length !== words.length) {
    throw new RangeError(
      `word vectors differ in length: ${target.length} and ${words.length}`,
    );
  }
}

/** Adds `words` to `target` element-wise modulo 2^32. */
export function addWordsInPlace(target: Uint32Array, words: Uint32Array): void {
  checkSameLength(target, words);
  for (let i = 0; i < target.length; i++) target[i] += words[i];
}

/** Subtracts `words` from `target` element-wise modulo 2^32. */
export function subtractWordsInPlace(
  target: Uint32Array,
  words: Uint32Array,
): void {
  checkSameLength(target, words);
  for (let i = 0; i < target.length; i++) target[i] -= words[i];
}

/**
 * Returns +1 when vehicle `own` adds the pairwise mask it shares with
 * `peer` and -1 when it subtracts it. It adds for a peer whose id sorts
 * after its own in UTF-16 code unit order (as `<` compares strings), so
 * the two masks of a pair cancel in the sum.
 */
export function pairwiseMaskSign(own: string, peer: string): 1 | -1 {
  return peer > own ? 1 : -1;
}
