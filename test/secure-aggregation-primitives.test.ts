import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import { ErrorCode, FleetError } from '../protocol/index.ts';
import {
  FIELD_PRIME,
  agreeX25519,
  bytesToFieldElement,
  combineShares,
  decryptShareBundle,
  derivePairwiseMaskSeed,
  deriveSelfMaskSeed,
  encryptShareBundle,
  expandMask,
  exportX25519PrivateKey,
  fieldElementToBytes,
  generateX25519KeyPair,
  importX25519PrivateKey,
  splitSecret,
} from '../secure-aggregation/index.ts';
import type { ShareBundle } from '../secure-aggregation/index.ts';

describe('expandMask', () => {
  test('matches AES-256-CTR known answer', () => {
    // AES-256 of the zero block under the zero key is the bytes
    // dc95c078 a2408989 ad48a214 92842087; the mask reads them as
    // little-endian words, with the counter block starting at zero.
    const mask = expandMask(new Uint8Array(32), 4);

    assert.deepEqual(
      [...mask],
      [0x78c095dc, 0x898940a2, 0x14a248ad, 0x87208492],
    );
  });

  test('same seed gives same mask', () => {
    const seed = randomBytes(32);

    const first = expandMask(seed, 10_000);
    const second = expandMask(seed, 10_000);

    assert.deepEqual(first, second);
  });

  test('longer mask extends shorter one', () => {
    const seed = randomBytes(32);

    const short = expandMask(seed, 7);
    const long = expandMask(seed, 1_000);

    assert.deepEqual(long.subarray(0, 7), short);
  });

  test('different seeds give different masks', () => {
    const seed = randomBytes(32);
    const other = Uint8Array.from(seed);
    other[31] ^= 1;

    const first = expandMask(seed, 64);
    const second = expandMask(other, 64);

    const equalWords = first.filter((word, i) => word === second[i]).length;
    assert.ok(equalWords <= 1, `${equalWords} equal words of 64`);
  });

  test('rejects bad seed and length', () => {
    assert.throws(() => expandMask(new Uint8Array(16), 4), RangeError);
    assert.throws(() => expandMask(new Uint8Array(32), -1), RangeError);
    assert.throws(() => expandMask(new Uint8Array(32), 1.5), RangeError);
  });
});

describe('key derivation', () => {
  test('both sides derive one pairwise seed', () => {
    const a = generateX25519KeyPair();
    const b = generateX25519KeyPair();

    const fromA = agreeX25519(a.privateKey, b.publicKey);
    const fromB = agreeX25519(b.privateKey, a.publicKey);
    const seedA = derivePairwiseMaskSeed(fromA, 'r1', 'veh-a', 'veh-b');
    const seedB = derivePairwiseMaskSeed(fromB, 'r1', 'veh-b', 'veh-a');

    assert.deepEqual(fromA, fromB);
    assert.deepEqual(seedA, seedB);
  });

  test('round and ids change the seed', () => {
    const secret = randomBytes(32);
    const base = derivePairwiseMaskSeed(secret, 'r1', 'veh-a', 'veh-b');

    const otherRound = derivePairwiseMaskSeed(secret, 'r2', 'veh-a', 'veh-b');
    const otherPair = derivePairwiseMaskSeed(secret, 'r1', 'veh-a', 'veh-c');
    // A naive concatenation would map ("r1", "veh-a") and ("r1veh", "-a")
    // to one string; the length prefixes keep them apart.
    const shifted = derivePairwiseMaskSeed(secret, 'r1veh', '-a', 'veh-b');
    const selfSeed = deriveSelfMaskSeed(secret, 'r1', 'veh-a');

    for (const other of [otherRound, otherPair, shifted, selfSeed]) {
      assert.notDeepEqual(other, base);
    }
  });

  test('private key survives raw round trip', () => {
    const pair = generateX25519KeyPair();

    const raw = exportX25519PrivateKey(pair.privateKey);
    const imported = importX25519PrivateKey(raw);

    assert.equal(raw.length, 32);
    assert.deepEqual(imported.publicKey, pair.publicKey);
  });

  test('agreement rejects short public key', () => {
    const pair = generateX25519KeyPair();

    assert.throws(
      () => agreeX25519(pair.privateKey, new Uint8Array(31)),
      (err: unknown) =>
        err instanceof FleetError && err.code === ErrorCode.MalformedPayload,
    );
  });
});

describe('shamir', () => {
  const xs = [1, 2, 3, 4, 5, 6, 7];

  test('any threshold shares reconstruct', () => {
    const secret = bytesToFieldElement(randomBytes(32));

    const shares = splitSecret(secret, 4, xs);

    assert.equal(combineShares(shares, 4), secret);
    assert.equal(combineShares(shares.slice(3), 4), secret);
    assert.equal(
      combineShares([shares[6], shares[0], shares[4], shares[2]], 4),
      secret,
    );
  });

  test('fewer shares give another value', () => {
    const secret = bytesToFieldElement(randomBytes(32));
    const shares = splitSecret(secret, 4, xs);

    // Interpolating 3 points of a degree-3 polynomial gives a random value.
    const guess = combineShares(shares.slice(0, 3), 3);

    assert.notEqual(guess, secret);
    assert.throws(() => combineShares(shares.slice(0, 3), 4), RangeError);
  });

  test('shares look uniform in field', () => {
    const shares = splitSecret(0n, 3, xs);

    // For the secret 0 every share is still a full-width field element.
    for (const share of shares) {
      assert.ok(share.y > FIELD_PRIME >> 32n, `share ${share.x} is small`);
      assert.ok(share.y < FIELD_PRIME);
    }
  });

  test('rejects bad points and threshold', () => {
    assert.throws(() => splitSecret(1n, 2, [1, 1, 2]), RangeError);
    assert.throws(() => splitSecret(1n, 2, [0, 1, 2]), RangeError);
    assert.throws(() => splitSecret(1n, 4, [1, 2, 3]), RangeError);
    assert.throws(() => splitSecret(FIELD_PRIME, 2, [1, 2]), RangeError);
  });

  test('field element byte round trip', () => {
    const bytes = randomBytes(32);

    const value = bytesToFieldElement(bytes);

    assert.deepEqual(fieldElementToBytes(value, 32), new Uint8Array(bytes));
    assert.throws(() => fieldElementToBytes(1n << 256n, 32), RangeError);
  });
});

describe('share encryption', () => {
  const address = { roundId: 'r1', senderId: 'veh-a', recipientId: 'veh-b' };
  const bundle: ShareBundle = {
    x: 2,
    maskKeyShare: 12345n,
    selfMaskShare: 678n,
  };

  function isAuthFailure(err: unknown): boolean {
    return err instanceof FleetError && err.code === ErrorCode.DigestMismatch;
  }

  test('recipient decrypts bundle', () => {
    const sender = generateX25519KeyPair();
    const recipient = generateX25519KeyPair();

    const sealed = encryptShareBundle(
      bundle,
      address,
      sender.privateKey,
      recipient.publicKey,
    );
    const opened = decryptShareBundle(
      sealed,
      recipient.privateKey,
      sender.publicKey,
    );

    assert.deepEqual(opened, bundle);
  });

  test('flipped ciphertext bit fails authentication', () => {
    const sender = generateX25519KeyPair();
    const recipient = generateX25519KeyPair();
    const sealed = encryptShareBundle(
      bundle,
      address,
      sender.privateKey,
      recipient.publicKey,
    );

    sealed.ciphertext[10] ^= 0x01;

    assert.throws(
      () => decryptShareBundle(sealed, recipient.privateKey, sender.publicKey),
      isAuthFailure,
    );
  });

  test('rerouted share fails authentication', () => {
    const sender = generateX25519KeyPair();
    const recipient = generateX25519KeyPair();
    const sealed = encryptShareBundle(
      bundle,
      address,
      sender.privateKey,
      recipient.publicKey,
    );

    const rerouted = { ...sealed, recipientId: 'veh-c' };
    const replayed = { ...sealed, roundId: 'r2' };

    for (const altered of [rerouted, replayed]) {
      assert.throws(
        () =>
          decryptShareBundle(altered, recipient.privateKey, sender.publicKey),
        isAuthFailure,
      );
    }
  });
});
