/**
 * Checks of a release notice before the vehicle acts on it: the
 * signature, its key and the release sequence. The highest sequence
 * accepted is kept in the state directory, so a replayed older notice is
 * rejected after a restart too.
 */
import { createHash } from 'node:crypto';
import {
  existsSync,
  mkdirSync,
  readFileSync,
  renameSync,
  writeFileSync,
} from 'node:fs';
import path from 'node:path';
import {
  ErrorCode,
  FleetError,
  decodeModelRelease,
  decodeSignedRelease,
  verifyEnvelope,
  type Logger,
  type ModelRelease,
  type PublicKeySet,
} from '../protocol/index.ts';

/** File in the state directory with the highest accepted sequence. */
export const RELEASE_SEQUENCE_FILE = 'release-sequence.json';

/** Options of {@link ReleaseVerifier}. */
export interface ReleaseVerifierOptions {
  stateDir: string;
  /**
   * Public keys of the fleet's release signers. When set, only notices
   * signed with one of them are accepted.
   */
  trustedKeys?: PublicKeySet;
  log: Logger;
}

/** The highest release sequence accepted, with its manifest's digest. */
interface AcceptedSequence {
  releaseSequence: number;
  /** Hex SHA-256 of the signed manifest bytes. */
  manifestSha256: string;
}

/**
 * Turns the payload of the release topic into a notice to act on.
 *
 * With trusted keys the payload must be a SignedRelease whose key is
 * trusted and whose signature verifies over the manifest bytes as
 * received. Only then is the manifest decoded. Its release sequence must
 * not be below the highest accepted, and an equal sequence must carry the
 * same manifest (a retained notice delivered again).
 *
 * Without trusted keys (development), a bare ModelRelease is accepted, and
 * a SignedRelease is unwrapped without a check, so the aggregator can
 * start signing before every vehicle has the keys.
 */
export class ReleaseVerifier {
  readonly #options: ReleaseVerifierOptions;
  readonly #path: string;
  #accepted: AcceptedSequence | undefined;

  constructor(options: ReleaseVerifierOptions) {
    this.#options = options;
    this.#path = path.join(options.stateDir, RELEASE_SEQUENCE_FILE);
    this.#accepted = this.#readAccepted();
  }

  /** True when only signed notices are accepted. */
  get requiresSignature(): boolean {
    return this.#options.trustedKeys !== undefined;
  }

  /** Highest release sequence accepted so far; 0 before the first. */
  get highestSequence(): number {
    return this.#accepted?.releaseSequence ?? 0;
  }

  /**
   * Checks `payload` from the release topic and returns its notice. A
   * signed notice with a higher sequence is recorded on disk before it is
   * returned. `check` runs on the decoded notice before anything is
   * recorded, so a notice it rejects cannot advance the sequence.
   *
   * @throws {FleetError} MALFORMED_PAYLOAD on bad bytes, NOT_SIGNED for a
   *   bare notice when keys are trusted, UNKNOWN_KEY or INVALID_SIGNATURE
   *   from the signature check, RELEASE_REPLAYED for a sequence below the
   *   highest accepted, or an equal one with another manifest.
   */
  open(
    payload: Uint8Array,
    check: (release: ModelRelease) => void = () => undefined,
  ): ModelRelease {
    const trustedKeys = this.#options.trustedKeys;
    const envelope = decodeSignedRelease(payload);
    if (envelope === undefined) {
      if (trustedKeys !== undefined) {
        throw new FleetError(
          ErrorCode.NotSigned,
          'release notice is not signed, and this vehicle accepts only ' +
            `notices signed with one of its ${trustedKeys.size} trusted keys`,
        );
      }
      const bare = decodeModelRelease(payload);
      check(bare);
      return bare;
    }
    if (trustedKeys === undefined) {
      const unchecked = decodeModelRelease(envelope.signedBytes);
      check(unchecked);
      return unchecked;
    }

    verifyEnvelope('release', envelope, trustedKeys);
    const release = decodeModelRelease(envelope.signedBytes);
    check(release);
    const manifestSha256 = createHash('sha256')
      .update(envelope.signedBytes)
      .digest('hex');
    this.#checkSequence(release, manifestSha256);
    return release;
  }

  #checkSequence(release: ModelRelease, manifestSha256: string): void {
    const releaseSequence = release.releaseSequence ?? 0;
    const accepted = this.#accepted;
    if (accepted !== undefined) {
      const isOlder = releaseSequence < accepted.releaseSequence;
      const isReused =
        releaseSequence === accepted.releaseSequence &&
        manifestSha256 !== accepted.manifestSha256;
      if (isOlder || isReused) {
        throw new FleetError(
          ErrorCode.ReleaseReplayed,
          `release notice of version ${release.version} has sequence ` +
            `${releaseSequence}, but this vehicle already accepted ` +
            `sequence ${accepted.releaseSequence}` +
            (isReused ? ' with another manifest' : ''),
        );
      }
      if (releaseSequence === accepted.releaseSequence) return;
    }
    this.#writeAccepted({ releaseSequence, manifestSha256 });
  }

  #readAccepted(): AcceptedSequence | undefined {
    if (!existsSync(this.#path)) return undefined;
    try {
      const parsed = JSON.parse(
        readFileSync(this.#path, 'utf8'),
      ) as Partial<AcceptedSequence>;
      if (
        !Number.isSafeInteger(parsed.releaseSequence) ||
        typeof parsed.manifestSha256 !== 'string'
      ) {
        throw new Error('expected releaseSequence and manifestSha256');
      }
      return parsed as AcceptedSequence;
    } catch (err) {
      // NOTE: without the record an older signed notice is accepted once,
      // until a newer one raises the sequence again.
      this.#options.log.error(
        { err, path: this.#path },
        'release sequence record unreadable, replay check starts over',
      );
      return undefined;
    }
  }

  #writeAccepted(accepted: AcceptedSequence): void {
    const temporary = `${this.#path}.${process.pid}.tmp`;
    mkdirSync(this.#options.stateDir, { recursive: true });
    writeFileSync(temporary, `${JSON.stringify(accepted, null, 2)}\n`);
    renameSync(temporary, this.#path);
    this.#accepted = accepted;
  }
}

/**
 * Returns the version a release payload claims, for the log line of a
 * rejected notice, or -1 when it has none. The value is unauthenticated.
 */
export function claimedVersionOf(payload: Uint8Array): number {
  try {
    const envelope = decodeSignedRelease(payload);
    return decodeModelRelease(envelope?.signedBytes ?? payload).version;
  } catch {
    return -1;
  }
}
