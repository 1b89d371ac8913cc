/**
 * Publishes releases as retained chunks plus a retained notice, and keeps
 * the broker's retained chunks to the current and the previous version.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { FleetTopics, Logger } from '../protocol/index.ts';
import type { StoredModel } from './model-store.ts';
import { encodeRelease } from './release-messages.ts';
import type { ReleaseSigner } from './release-signer.ts';
import { writeFileAtomic } from './state.ts';

/** Publishes one retained QoS 1 message; an empty payload clears it. */
export type PublishRetained = (
  topic: string,
  payload: Uint8Array,
) => Promise<void>;

/** Options of {@link ReleasePublisher}. */
export interface ReleasePublisherOptions {
  /** Directory of `releases.json`, the record of retained chunks. */
  stateDir: string;
  topics: FleetTopics;
  /** Maximum size of one notice or chunk message. */
  maxMessageBytes: number;
  log: Logger;
  /** Signs every notice; without it notices go out unsigned. */
  signer?: ReleaseSigner;
}

/** Sizes of one published release. */
export interface PublishedRelease {
  noticeBytes: number;
  chunkCount: number;
  /** Bytes of every encoded chunk message together. */
  chunkBytes: number;
  /** Sequence and key of a signed notice; undefined when unsigned. */
  releaseSequence?: number;
  keyId?: string;
  /** The signed notice as published; undefined when unsigned. */
  signedNotice?: Uint8Array;
}

/** A version whose chunk topics 0..chunkCount-1 may be retained. */
interface RetainedChunks {
  version: number;
  chunkCount: number;
}

const RECORD_FILE = 'releases.json';

/**
 * Publishes releases and clears old retained chunks. `releases.json`
 * lists the versions whose chunks may still be retained, oldest
 * publication first. It is written before chunks are published and after
 * they are cleared, so after a crash it still names every retained chunk.
 */
export class ReleasePublisher {
  readonly #options: ReleasePublisherOptions;
  readonly #recordPath: string;

  constructor(options: ReleasePublisherOptions) {
    this.#options = options;
    this.#recordPath = join(options.stateDir, RECORD_FILE);
  }

  /**
   * Publishes the chunks of `model`, then its notice (signed when the
   * options have a signer), then clears the chunks of every version
   * except this one and the previous one. The previous one is the latest
   * version published before this one with a lower number, so after a
   * rollback the withdrawn versions are cleared.
   *
   * @throws {FleetError} PAYLOAD_TOO_LARGE when the notice does not fit.
   * @throws {Error} from the MQTT client when a publish fails.
   */
  async publish(
    model: StoredModel,
    publish: PublishRetained,
  ): Promise<PublishedRelease> {
    const { topics, maxMessageBytes } = this.#options;
    const { version } = model.manifest;
    const encoded = encodeRelease(model.manifest, model.onnx, maxMessageBytes);
    const chunkCount = encoded.chunks.length;

    const record = this.#readRecord();
    const earlier = record.find((entry) => entry.version === version);
    const others = record.filter((entry) => entry.version !== version);
    const retainedCount = Math.max(earlier?.chunkCount ?? 0, chunkCount);
    this.#writeRecord([...others, { version, chunkCount: retainedCount }]);

    let chunkBytes = 0;
    for (const [index, chunk] of encoded.chunks.entries()) {
      await publish(topics.releaseChunk(version, index), chunk);
      chunkBytes += chunk.byteLength;
    }
    // A republication with larger chunks leaves fewer topics in use.
    if (retainedCount > chunkCount) {
      await this.#clear(
        { version, chunkCount: retainedCount },
        publish,
        chunkCount,
      );
      this.#writeRecord([...others, { version, chunkCount }]);
    }
    const signed = this.#options.signer?.sign(encoded.release, maxMessageBytes);
    const notice = signed?.notice ?? encoded.notice;
    await publish(topics.release(), notice);

    await this.#clearStale([...others, { version, chunkCount }], publish);
    return {
      noticeBytes: notice.byteLength,
      chunkCount,
      chunkBytes,
      releaseSequence: signed?.releaseSequence,
      keyId: signed?.keyId,
      signedNotice: signed?.notice,
    };
  }

  /** Clears every version in `record` except the last and its predecessor. */
  async #clearStale(
    record: RetainedChunks[],
    publish: PublishRetained,
  ): Promise<void> {
    const current = record[record.length - 1];
    const keep = [current];
    for (let i = record.length - 2; i >= 0; i--) {
      if (record[i].version < current.version) {
        keep.push(record[i]);
        break;
      }
    }
    let remaining = record;
    for (const entry of record) {
      if (keep.includes(entry)) continue;
      await this.#clear(entry, publish, 0);
      remaining = remaining.filter((other) => other !== entry);
      this.#writeRecord(remaining);
      this.#options.log.info(
        { modelVersion: entry.version, chunkCount: entry.chunkCount },
        'retained release chunks cleared',
      );
    }
  }

  /** Clears chunk topics `fromIndex` and up with empty retained messages. */
  async #clear(
    entry: RetainedChunks,
    publish: PublishRetained,
    fromIndex: number,
  ): Promise<void> {
    const empty = new Uint8Array(0);
    for (let index = fromIndex; index < entry.chunkCount; index++) {
      await publish(
        this.#options.topics.releaseChunk(entry.version, index),
        empty,
      );
    }
  }

  #readRecord(): RetainedChunks[] {
    if (!existsSync(this.#recordPath)) return [];
    try {
      const parsed = JSON.parse(readFileSync(this.#recordPath, 'utf8')) as {
        retained?: unknown;
      };
      if (!Array.isArray(parsed.retained)) {
        throw new Error('the record has no "retained" list');
      }
      return parsed.retained.filter(isRetainedChunks);
    } catch (err) {
      // Only the cleanup of old chunks depends on the record, so a damaged
      // one costs broker memory, not correctness.
      this.#options.log.warn(
        { err, path: this.#recordPath },
        'release record unreadable, old retained chunks may stay',
      );
      return [];
    }
  }

  #writeRecord(record: RetainedChunks[]): void {
    const text = JSON.stringify({ retained: record }, null, 2);
    writeFileAtomic(this.#recordPath, `${text}\n`);
  }
}

function isRetainedChunks(value: unknown): value is RetainedChunks {
  const entry = value as Partial<RetainedChunks> | null;
  return (
    typeof entry === 'object' &&
    entry !== null &&
    Number.isSafeInteger(entry.version) &&
    Number.isSafeInteger(entry.chunkCount)
  );
}
