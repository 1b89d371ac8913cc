/**
 * The download of one chunked release. The agent subscribes to the
 * retained chunk topics it still lacks, a few at a time, and checks each
 * chunk against the digest in the release notice. A chunk that matches is
 * written to `<stateDir>/downloads/<model>-v<version>/<index>.chunk`
 * through a temporary file and a rename. After a disconnect or a restart
 * only the missing chunks are requested again.
 */
import { readFile, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { sha256Hex } from '../models/index.ts';
import {
  ErrorCode,
  FleetError,
  decodeReleaseChunk,
  isFleetError,
  type FleetTopics,
  type Logger,
  type ModelRelease,
} from '../protocol/index.ts';
import { verifyRelease } from './deployment.ts';
import { writeFileAtomic } from './model-files.ts';

/** Checks of one chunk, counting the first, before its release is rejected. */
export const MAX_CHUNK_ATTEMPTS = 3;
/** Chunk topics subscribed at once; bounds the chunk bytes in flight. */
export const MAX_CHUNKS_IN_FLIGHT = 4;

/** Subscriptions of the agent's MQTT client, as the downloader uses them. */
export interface ChunkTransport {
  isConnected(): boolean;
  /** Subscribes with QoS 1; the broker then sends the retained chunks. */
  subscribe(topics: string[]): Promise<void>;
  unsubscribe(topics: string[]): Promise<void>;
}

/** Chunk traffic of one agent since it was created. */
export interface DownloadCounters {
  /** Chunk messages received for the release being downloaded. */
  chunksReceived: number;
  /** Chunks that matched their digest and were written to disk. */
  chunksStored: number;
  /** Chunks dropped for a wrong digest or a malformed payload. */
  chunksRejected: number;
  /** Chunk topics subscribed to, each fetch again counted. */
  chunkSubscriptions: number;
}

/** Returns download counters with every value zero. */
export function createDownloadCounters(): DownloadCounters {
  return {
    chunksReceived: 0,
    chunksStored: 0,
    chunksRejected: 0,
    chunkSubscriptions: 0,
  };
}

/** Options of a release download. */
export interface DownloadOptions {
  stateDir: string;
  topics: FleetTopics;
  transport: ChunkTransport;
  log: Logger;
  /** Counters the downloader updates in place. */
  counters: DownloadCounters;
}

/** Directory of the downloads, below the state directory. */
export const DOWNLOADS_DIR = 'downloads';

/** Identity of a release: version and digest. */
export function keyOf(release: ModelRelease): string {
  return `${release.version}:${release.sha256.toLowerCase()}`;
}

/** Name of the download directory of `release`. */
export function dirNameOf(release: ModelRelease): string {
  return `${release.modelName}-v${release.version}`;
}

function chunkFileOf(index: number): string {
  return `${index}.chunk`;
}

/**
 * One release download. Every step runs on one promise chain, so chunk
 * messages, reconnections and cancellation never interleave.
 */
export class ChunkDownload {
  readonly key: string;
  readonly dir: string;
  readonly result: Promise<Uint8Array | undefined>;
  private resolveResult!: (onnx: Uint8Array | undefined) => void;
  private rejectResult!: (err: unknown) => void;
  private readonly stored = new Set<number>();
  private readonly inFlight = new Set<number>();
  private readonly attempts = new Map<number, number>();
  private chain: Promise<void> = Promise.resolve();
  private finished = false;
  private readonly startedAtMs = Date.now();

  constructor(
    readonly release: ModelRelease,
    private readonly options: DownloadOptions,
  ) {
    this.key = keyOf(release);
    this.dir = path.join(options.stateDir, DOWNLOADS_DIR, dirNameOf(release));
    this.result = new Promise((resolve, reject) => {
      this.resolveResult = resolve;
      this.rejectResult = reject;
    });
  }

  get isFinished(): boolean {
    return this.finished;
  }

  start(): void {
    this.enqueue(async () => {
      await this.loadStored();
      if (this.stored.size === this.release.chunkCount) await this.complete();
      else await this.requestMore();
    });
  }

  receive(index: number, payload: Uint8Array): void {
    this.enqueue(() => this.store(index, payload));
  }

  /** Requests the chunks in flight again after a (re)connection. */
  resume(): void {
    this.enqueue(async () => {
      const again = [...this.inFlight];
      this.inFlight.clear();
      await this.unsubscribe(again);
      await this.requestMore();
    });
  }

  /** Ends the download with no result; files stay on disk. */
  cancel(unsubscribe: boolean): void {
    if (this.finished) return;
    this.finished = true;
    this.resolveResult(undefined);
    if (unsubscribe) void this.unsubscribe([...this.inFlight]);
  }

  private enqueue(step: () => Promise<void>): void {
    this.chain = this.chain
      .then(() => (this.finished ? undefined : step()))
      .catch((err: unknown) => this.fail(err));
  }

  /** Keeps chunk files that match their digest and deletes the rest. */
  private async loadStored(): Promise<void> {
    const { chunkCount, chunkSha256, version } = this.release;
    let names: string[] = [];
    try {
      names = await readdir(this.dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    for (const name of names) {
      const index = /^(\d+)\.chunk$/.exec(name);
      const position = index === null ? -1 : Number(index[1]);
      const file = path.join(this.dir, name);
      if (position >= 0 && position < chunkCount) {
        const data = new Uint8Array(await readFile(file));
        if (sha256Hex(data) === chunkSha256[position]) {
          this.stored.add(position);
          continue;
        }
      }
      // Temporary files of an interrupted write, and chunks of another
      // release that had this version number.
      await rm(file, { force: true });
    }
    const fields = { modelVersion: version, chunkCount };
    if (this.stored.size > 0) {
      this.options.log.info(
        { ...fields, storedChunks: this.stored.size },
        'release download resumed',
      );
    } else {
      this.options.log.info(
        { ...fields, bytes: this.release.sizeBytes },
        'release download started',
      );
    }
  }

  /** Subscribes to missing chunks until MAX_CHUNKS_IN_FLIGHT are requested. */
  private async requestMore(): Promise<void> {
    const { transport, counters, topics, log } = this.options;
    if (this.finished || !transport.isConnected()) return;
    const requested: number[] = [];
    for (let index = 0; index < this.release.chunkCount; index++) {
      if (this.inFlight.size + requested.length >= MAX_CHUNKS_IN_FLIGHT) break;
      if (!this.stored.has(index) && !this.inFlight.has(index)) {
        requested.push(index);
      }
    }
    if (requested.length === 0) return;
    for (const index of requested) this.inFlight.add(index);
    const chunkTopics = requested.map((index) =>
      topics.releaseChunk(this.release.version, index),
    );
    try {
      await transport.subscribe(chunkTopics);
      counters.chunkSubscriptions += requested.length;
    } catch (err) {
      // The next connection requests them again.
      for (const index of requested) this.inFlight.delete(index);
      log.warn(
        { err, modelVersion: this.release.version, topics: chunkTopics },
        'release chunk subscription failed',
      );
    }
  }

  private async store(index: number, payload: Uint8Array): Promise<void> {
    const { counters, log } = this.options;
    const { version, chunkCount } = this.release;
    counters.chunksReceived += 1;
    if (this.stored.has(index) || index >= chunkCount) {
      log.debug({ modelVersion: version, index }, 'release chunk ignored');
      return;
    }
    let data: Uint8Array;
    try {
      data = this.checkChunk(index, payload);
    } catch (err) {
      await this.rejectChunk(index, err);
      return;
    }

    await writeFileAtomic(path.join(this.dir, chunkFileOf(index)), data);
    this.stored.add(index);
    this.inFlight.delete(index);
    counters.chunksStored += 1;
    log.debug(
      { modelVersion: version, index, bytes: data.byteLength },
      'release chunk stored',
    );
    await this.unsubscribe([index]);
    if (this.stored.size === chunkCount) await this.complete();
    else await this.requestMore();
  }

  /**
   * Decodes chunk `index` and checks its identity and digest.
   *
   * @throws {FleetError} MALFORMED_PAYLOAD or DIGEST_MISMATCH.
   */
  private checkChunk(index: number, payload: Uint8Array): Uint8Array {
    const { modelName, version, chunkSha256 } = this.release;
    const chunk = decodeReleaseChunk(payload);
    if (
      chunk.modelName !== modelName ||
      chunk.version !== version ||
      chunk.index !== index
    ) {
      throw new FleetError(
        ErrorCode.MalformedPayload,
        `chunk topic ${index} of ${modelName} version ${version} carries ` +
          `chunk ${chunk.index} of ${chunk.modelName} version ${chunk.version}`,
      );
    }
    const digest = sha256Hex(chunk.data);
    if (digest !== chunkSha256[index]) {
      throw new FleetError(
        ErrorCode.DigestMismatch,
        `chunk ${index} of release version ${version} has SHA-256 ` +
          `${digest}, but the notice lists ${chunkSha256[index]}`,
      );
    }
    return chunk.data;
  }

  /**
   * Counts and logs a bad chunk, then fetches the retained copy again, or
   * fails the download after MAX_CHUNK_ATTEMPTS checks of that chunk.
   */
  private async rejectChunk(index: number, err: unknown): Promise<void> {
    const { counters, log, transport, topics } = this.options;
    const { version } = this.release;
    const code = isFleetError(err) ? err.code : ErrorCode.MalformedPayload;
    const attempt = (this.attempts.get(index) ?? 0) + 1;
    this.attempts.set(index, attempt);
    counters.chunksRejected += 1;
    log.warn(
      { err, modelVersion: version, index, code, attempt },
      'release chunk rejected',
    );
    if (attempt >= MAX_CHUNK_ATTEMPTS) {
      throw new FleetError(
        code,
        `chunk ${index} of release version ${version} failed its check ` +
          `${attempt} times; the release is rejected and the model in ` +
          'service stays',
        { cause: err },
      );
    }
    // Unsubscribing first makes the broker send the retained copy again.
    if (this.finished || !transport.isConnected()) return;
    await this.unsubscribe([index]);
    this.inFlight.add(index);
    await transport.subscribe([topics.releaseChunk(version, index)]);
    counters.chunkSubscriptions += 1;
  }

  /** Joins the chunks and checks the whole file against the notice. */
  private async complete(): Promise<void> {
    const { chunkCount, sizeBytes, version } = this.release;
    const parts: Uint8Array[] = [];
    for (let index = 0; index < chunkCount; index++) {
      parts.push(await readFile(path.join(this.dir, chunkFileOf(index))));
    }
    const onnx = new Uint8Array(
      parts.reduce((sum, part) => sum + part.byteLength, 0),
    );
    let offset = 0;
    for (const part of parts) {
      onnx.set(part, offset);
      offset += part.byteLength;
    }
    try {
      verifyRelease(this.release, onnx);
    } catch (err) {
      // Every chunk matched its digest, so the notice itself is wrong and
      // fetching the chunks again cannot help.
      await rm(this.dir, { recursive: true, force: true });
      throw err;
    }
    this.finished = true;
    this.options.log.info(
      {
        modelVersion: version,
        chunkCount,
        bytes: sizeBytes,
        durationMs: Date.now() - this.startedAtMs,
      },
      'release download finished',
    );
    this.resolveResult(onnx);
  }

  private async fail(err: unknown): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    const pending = [...this.inFlight];
    this.inFlight.clear();
    await this.unsubscribe(pending);
    this.rejectResult(err);
  }

  /** Unsubscribes from chunk topics; failures only cost broker traffic. */
  private async unsubscribe(indices: number[]): Promise<void> {
    const { transport, topics, log } = this.options;
    if (indices.length === 0 || !transport.isConnected()) return;
    const chunkTopics = indices.map((index) =>
      topics.releaseChunk(this.release.version, index),
    );
    try {
      await transport.unsubscribe(chunkTopics);
    } catch (err) {
      log.debug({ err, topics: chunkTopics }, 'chunk unsubscribe failed');
    }
  }
}
