import assert from 'node:assert/strict';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import {
  ErrorCode,
  FleetError,
  createLogger,
  decodeModelRelease,
  decodeSignedRelease,
  decodeSignedUpdate,
  decodeUpdatePayload,
  encodeModelRelease,
  encodeModelUpdate,
  encodeSignedRelease,
  loadSigningKey,
  readPublicKeys,
  verifyEnvelope,
  type ModelRelease,
  type ModelUpdate,
} from '../protocol/index.ts';
import {
  RELEASE_SEQUENCE_FILE,
  ReleaseVerifier,
} from '../vehicle-agent/release-verifier.ts';
import {
  createKeyFolder,
  signRelease,
  signUpdate,
  type KeyFolder,
  type TestKey,
} from './signing-fixtures.ts';

const silent = createLogger({ level: 'silent' });

function release(version: number): ModelRelease {
  return {
    modelName: 'gtsrb-cnn',
    version,
    parentVersion: Math.max(version - 1, 0),
    round: version,
    sha256: 'ef'.repeat(32),
    sizeBytes: 7,
    createdAtMs: 5,
    testAccuracy: 0.9,
    numVehicles: 3,
    numExamples: 400,
    chunkSizeBytes: 4,
    chunkCount: 2,
    chunkSha256: ['ab'.repeat(32), 'cd'.repeat(32)],
  };
}

const update: ModelUpdate = {
  updateId: 'u-1',
  vehicleId: 'veh-1',
  modelName: 'gtsrb-cnn',
  baseModelVersion: 3,
  round: 5,
  numExamples: 12,
  deltas: [],
  metrics: {
    trainLoss: 1,
    trainAccuracy: 0.5,
    trainDurationMs: 3,
    backend: 'cpu',
  },
  createdAtMs: 1,
};

function assertCode(code: string): (err: unknown) => true {
  return (err) => {
    assert.ok(err instanceof FleetError, `expected FleetError, got ${err}`);
    assert.equal(err.code, code);
    return true;
  };
}

let keys: KeyFolder;
let fleetKey: TestKey;
let otherKey: TestKey;

function tempStateDir(): string {
  return mkdtempSync(path.join(keys.dir, 'state-'));
}

function verifierFor(
  trusted: TestKey[] | undefined,
  stateDir = tempStateDir(),
): ReleaseVerifier {
  const trustedKeys =
    trusted === undefined
      ? undefined
      : readPublicKeys(keys.writePublicKeys('trusted.json', trusted));
  return new ReleaseVerifier({ stateDir, trustedKeys, log: silent });
}

before(() => {
  keys = createKeyFolder();
  fleetKey = keys.createKey('fleet');
  otherKey = keys.createKey('other');
});

after(() => keys.remove());

describe('signing keys', () => {
  test('key id matches public key', () => {
    const file = keys.writePublicKeys('one.json', [fleetKey]);

    const loaded = readPublicKeys(file);

    assert.deepEqual([...loaded.keys()], [fleetKey.keyId]);
    assert.match(fleetKey.keyId, /^[0-9a-f]{16}$/);
  });

  test('private key mode 0644 rejected', () => {
    const file = path.join(keys.dir, 'loose.key.pem');
    writeFileSync(file, 'unused');
    chmodSync(file, 0o644);

    assert.throws(
      () => loadSigningKey(file),
      assertCode(ErrorCode.InvalidConfig),
    );
  });

  test('wrong key id in file rejected', () => {
    const file = path.join(keys.dir, 'wrong-id.json');
    const entry = { keyId: otherKey.keyId, publicKey: fleetKey.publicKeyPem };
    writeFileSync(file, JSON.stringify({ keys: [entry] }));

    assert.throws(
      () => readPublicKeys(file),
      assertCode(ErrorCode.InvalidConfig),
    );
  });

  test('key folder merges vehicle files', () => {
    const folder = path.join(keys.dir, 'vehicle-keys');
    mkdirSync(folder);
    keys.writePublicKeys('vehicle-keys/veh-a.json', [fleetKey], 'veh-a');
    keys.writePublicKeys('vehicle-keys/veh-b.json', [otherKey], 'veh-b');

    const loaded = readPublicKeys(folder);

    assert.equal(loaded.size, 2);
    assert.equal(loaded.get(fleetKey.keyId)?.vehicleId, 'veh-a');
    assert.equal(loaded.get(otherKey.keyId)?.vehicleId, 'veh-b');
  });

  test('signing key hides its secret', () => {
    const text = JSON.stringify({ key: fleetKey.signer });

    assert.equal(text.includes('PRIVATE'), false);
    assert.ok(text.includes(fleetKey.keyId));
  });
});

describe('signed envelopes', () => {
  test('bare notice has no envelope', () => {
    const bare = encodeModelRelease(release(1));

    assert.equal(decodeSignedRelease(bare), undefined);
    assert.equal(decodeModelRelease(bare).releaseSequence, 0);
  });

  test('signed notice verifies exact bytes', () => {
    const payload = signRelease(fleetKey, release(2), 77);
    const trusted = readPublicKeys(keys.writePublicKeys('f.json', [fleetKey]));

    const envelope = decodeSignedRelease(payload)!;
    const key = verifyEnvelope('release', envelope, trusted);

    assert.equal(key.keyId, fleetKey.keyId);
    assert.equal(decodeModelRelease(envelope.signedBytes).releaseSequence, 77);
  });

  test('flipped manifest byte fails signature', () => {
    const payload = signRelease(fleetKey, release(2), 77);
    const envelope = decodeSignedRelease(payload)!;
    const manifest = Uint8Array.from(envelope.signedBytes);
    manifest[manifest.length - 3] ^= 0x01;
    const trusted = readPublicKeys(keys.writePublicKeys('f.json', [fleetKey]));

    assert.throws(
      () =>
        verifyEnvelope(
          'release',
          { ...envelope, signedBytes: manifest },
          trusted,
        ),
      assertCode(ErrorCode.InvalidSignature),
    );
  });

  test('update signature not valid for release', () => {
    const payload = signUpdate(fleetKey, update);
    const envelope = decodeSignedUpdate(payload)!;
    const trusted = readPublicKeys(keys.writePublicKeys('f.json', [fleetKey]));

    assert.throws(
      () => verifyEnvelope('release', envelope, trusted),
      assertCode(ErrorCode.InvalidSignature),
    );
  });

  test('update payload decodes both forms', () => {
    const bare = encodeModelUpdate(update);
    const signed = signUpdate(fleetKey, update);

    assert.equal(decodeUpdatePayload(bare).updateId, 'u-1');
    assert.equal(decodeUpdatePayload(signed).updateId, 'u-1');
    assert.equal(decodeSignedUpdate(bare), undefined);
  });

  test('envelope without signature malformed', () => {
    const manifest = encodeModelRelease(release(1));
    const payload = encodeSignedRelease({
      signedBytes: manifest,
      signature: new Uint8Array(0),
      keyId: fleetKey.keyId,
    });

    assert.throws(
      () => decodeSignedRelease(payload),
      assertCode(ErrorCode.MalformedPayload),
    );
  });
});

describe('release verifier', () => {
  test('rejected notice keeps the sequence', () => {
    const verifier = verifierFor([fleetKey]);
    const refuse = (): void => {
      throw new FleetError(ErrorCode.MalformedPayload, 'not for this topic');
    };

    assert.throws(
      () => verifier.open(signRelease(fleetKey, release(3), 50), refuse),
      assertCode(ErrorCode.MalformedPayload),
    );
    // A genuine notice with a lower sequence is still accepted.
    const opened = verifier.open(signRelease(fleetKey, release(1), 10));
    assert.equal(opened.version, 1);
    assert.equal(verifier.highestSequence, 10);
  });

  test('trusted signed notice accepted', () => {
    const verifier = verifierFor([fleetKey]);

    const opened = verifier.open(signRelease(fleetKey, release(1), 10));

    assert.equal(opened.version, 1);
    assert.equal(verifier.highestSequence, 10);
  });

  test('unsigned notice rejected with keys', () => {
    const verifier = verifierFor([fleetKey]);

    assert.throws(
      () => verifier.open(encodeModelRelease(release(1))),
      assertCode(ErrorCode.NotSigned),
    );
  });

  test('unknown key rejected', () => {
    const verifier = verifierFor([fleetKey]);

    assert.throws(
      () => verifier.open(signRelease(otherKey, release(1), 10)),
      assertCode(ErrorCode.UnknownKey),
    );
  });

  test('older sequence rejected as replay', () => {
    const verifier = verifierFor([fleetKey]);
    const old = signRelease(fleetKey, release(1), 10);
    verifier.open(old);
    verifier.open(signRelease(fleetKey, release(2), 11));

    assert.throws(
      () => verifier.open(old),
      assertCode(ErrorCode.ReleaseReplayed),
    );
    assert.equal(verifier.highestSequence, 11);
  });

  test('same notice delivered twice accepted', () => {
    const verifier = verifierFor([fleetKey]);
    const notice = signRelease(fleetKey, release(1), 10);
    verifier.open(notice);

    assert.equal(verifier.open(notice).version, 1);
  });

  test('reused sequence with other manifest rejected', () => {
    const verifier = verifierFor([fleetKey]);
    verifier.open(signRelease(fleetKey, release(1), 10));

    assert.throws(
      () => verifier.open(signRelease(fleetKey, release(2), 10)),
      assertCode(ErrorCode.ReleaseReplayed),
    );
  });

  test('rollback with newer sequence accepted', () => {
    const verifier = verifierFor([fleetKey]);
    verifier.open(signRelease(fleetKey, release(3), 10));

    const opened = verifier.open(signRelease(fleetKey, release(2), 11));

    assert.equal(opened.version, 2);
  });

  test('highest sequence survives restart', () => {
    const stateDir = tempStateDir();
    const first = verifierFor([fleetKey], stateDir);
    const old = signRelease(fleetKey, release(1), 10);
    first.open(old);
    first.open(signRelease(fleetKey, release(2), 20));

    const second = verifierFor([fleetKey], stateDir);

    assert.ok(existsSync(path.join(stateDir, RELEASE_SEQUENCE_FILE)));
    assert.equal(second.highestSequence, 20);
    assert.throws(
      () => second.open(old),
      assertCode(ErrorCode.ReleaseReplayed),
    );
  });

  test('without keys both forms accepted', () => {
    const verifier = verifierFor(undefined);

    const bare = verifier.open(encodeModelRelease(release(1)));
    const signed = verifier.open(signRelease(otherKey, release(2), 5));

    assert.equal(verifier.requiresSignature, false);
    assert.equal(bare.version, 1);
    assert.equal(signed.version, 2);
  });
});
