/**
 * Signing of release notices: every publication gets a release sequence
 * number, kept in the state directory, and the notice travels inside a
 * SignedRelease.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  encodeModelRelease,
  encodeSignedRelease,
  type Logger,
  type ModelRelease,
  type SigningKey,
} from '../protocol/index.ts';
import { writeFileAtomic } from './state.ts';

const SEQUENCE_FILE = 'release-sequence.json';

/** A signed notice ready to publish. */
export interface SignedNotice {
  /** Encoded SignedRelease. */
  notice: Uint8Array;
  releaseSequence: number;
  keyId: string;
}

/**
 * Signs notices with the fleet's release key. Vehicles reject a notice
 * whose sequence is below the highest they accepted, so the sequence must
 * never go back: the next one is the larger of the last one plus 1 and
 * the current time in ms. The time keeps sequences growing even when the
 * state directory is lost or restored from a backup, as long as the clock
 * does not go back.
 */
export class ReleaseSigner {
  readonly #key: SigningKey;
  readonly #path: string;
  readonly #log: Logger;
  #lastSequence: number;

  constructor(key: SigningKey, stateDir: string, log: Logger) {
    this.#key = key;
    this.#path = join(stateDir, SEQUENCE_FILE);
    this.#log = log;
    this.#lastSequence = this.#readLastSequence();
  }

  /** Id of the key that signs. */
  get keyId(): string {
    return this.#key.keyId;
  }

  /** Sequence of the last signed notice; 0 before the first. */
  get lastSequence(): number {
    return this.#lastSequence;
  }

  /**
   * Assigns the next release sequence to `release`, records it on disk
   * before anything is published, and signs the encoded notice.
   *
   * @throws {FleetError} PAYLOAD_TOO_LARGE when the signed notice exceeds
   *   `maxMessageBytes`.
   */
  sign(
    release: ModelRelease,
    maxMessageBytes: number,
    nowMs = Date.now(),
  ): SignedNotice {
    const releaseSequence = Math.max(this.#lastSequence + 1, nowMs);
    const manifest = encodeModelRelease(
      { ...release, releaseSequence },
      maxMessageBytes,
    );
    const envelope = this.#key.envelope('release', manifest);
    const notice = encodeSignedRelease(envelope, maxMessageBytes);

    writeFileAtomic(
      this.#path,
      `${JSON.stringify({ releaseSequence }, null, 2)}\n`,
    );
    this.#lastSequence = releaseSequence;
    return { notice, releaseSequence, keyId: this.#key.keyId };
  }

  #readLastSequence(): number {
    if (!existsSync(this.#path)) return 0;
    try {
      const parsed = JSON.parse(readFileSync(this.#path, 'utf8')) as {
        releaseSequence?: unknown;
      };
      const value = parsed.releaseSequence;
      if (typeof value === 'number' && Number.isSafeInteger(value)) {
        return value;
      }
      throw new Error(`releaseSequence is ${String(value)}, not an integer`);
    } catch (err) {
      // The clock still orders later sequences after earlier ones.
      this.#log.warn(
        { err, path: this.#path },
        'release sequence file unreadable, continuing from the clock',
      );
      return 0;
    }
  }
}
