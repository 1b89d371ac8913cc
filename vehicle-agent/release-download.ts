/**
 * Chunked release downloads on the vehicle, one release at a time (see
 * chunk-download.ts for one download).
 */
import { readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import type { MqttClient } from 'mqtt';
import type { ModelRelease } from '../protocol/index.ts';
import {
  ChunkDownload,
  DOWNLOADS_DIR,
  dirNameOf,
  keyOf,
  type ChunkTransport,
  type DownloadOptions,
} from './chunk-download.ts';

export {
  MAX_CHUNK_ATTEMPTS,
  MAX_CHUNKS_IN_FLIGHT,
  createDownloadCounters,
} from './chunk-download.ts';
export type {
  ChunkTransport,
  DownloadCounters,
  DownloadOptions,
} from './chunk-download.ts';

/** Chunk subscriptions through the client `client()` returns. */
export function mqttChunkTransport(
  client: () => MqttClient | undefined,
): ChunkTransport {
  return {
    isConnected: () => client()?.connected ?? false,
    subscribe: async (topics) => {
      await client()?.subscribeAsync(topics, { qos: 1 });
    },
    unsubscribe: async (topics) => {
      await client()?.unsubscribeAsync(topics);
    },
  };
}

/**
 * Downloads one release at a time. A new release supersedes the one
 * downloading, and the download directories of other releases are
 * deleted.
 */
export class ReleaseDownloader {
  private active: ChunkDownload | undefined;

  constructor(private readonly options: DownloadOptions) {}

  /**
   * Downloads the ONNX file of `release`, resuming from the chunks on
   * disk, and joins a download of the same release already running.
   * Resolves with the file once it matches the notice's size and digest,
   * or with undefined when a later release or `stop()` cancelled it.
   *
   * @throws {FleetError} DIGEST_MISMATCH or MALFORMED_PAYLOAD when a chunk
   *   failed MAX_CHUNK_ATTEMPTS checks, DIGEST_MISMATCH when the joined
   *   file does not match the notice.
   */
  fetch(release: ModelRelease): Promise<Uint8Array | undefined> {
    const active = this.active;
    if (active?.key === keyOf(release) && !active.isFinished) {
      return active.result;
    }
    active?.cancel(true);
    const download = new ChunkDownload(release, this.options);
    this.active = download;
    void this.prune(dirNameOf(release));
    download.start();
    return download.result;
  }

  /** Hands a message on a chunk topic to the download it belongs to. */
  handleChunk(version: number, index: number, payload: Uint8Array): void {
    const active = this.active;
    if (active === undefined || active.release.version !== version) {
      this.options.log.debug(
        { modelVersion: version, index },
        'chunk of no active download ignored',
      );
      return;
    }
    active.receive(index, payload);
  }

  /** Requests the missing chunks again after a (re)connection. */
  onConnected(): void {
    const active = this.active;
    if (active !== undefined && !active.isFinished) active.resume();
  }

  /** Cancels any download and deletes every download directory. */
  discardAll(): void {
    this.active?.cancel(true);
    this.active = undefined;
    void this.prune(undefined);
  }

  /** Deletes the download directory of `release`, once it is deployed. */
  async remove(release: ModelRelease): Promise<void> {
    if (this.active?.key === keyOf(release)) this.active = undefined;
    const dir = path.join(
      this.options.stateDir,
      DOWNLOADS_DIR,
      dirNameOf(release),
    );
    await rm(dir, { recursive: true, force: true });
  }

  /** Stops the active download; its files stay for the next start. */
  stop(): void {
    this.active?.cancel(false);
    this.active = undefined;
  }

  /** Deletes every download directory except `keep`. */
  private async prune(keep: string | undefined): Promise<void> {
    const root = path.join(this.options.stateDir, DOWNLOADS_DIR);
    try {
      const names = await readdir(root).catch((err: unknown) => {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
        throw err;
      });
      for (const name of names) {
        if (name === keep) continue;
        await rm(path.join(root, name), { recursive: true, force: true });
        this.options.log.info({ dir: name }, 'superseded download deleted');
      }
    } catch (err) {
      this.options.log.warn({ err, dir: root }, 'downloads not pruned');
    }
  }
}
