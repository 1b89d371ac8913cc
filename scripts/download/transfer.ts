/**
 * HTTP transfer of one archive: resumable download to a `.part` file with
 * connect and idle timeouts, progress output and an MD5 check.
 */
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync } from 'node:fs';
import { rename, rm, stat } from 'node:fs/promises';
import { basename } from 'node:path';
import { Readable, Transform } from 'node:stream';
import type { ReadableStream as WebReadableStream } from 'node:stream/web';
import { pipeline } from 'node:stream/promises';

import { SingleBar } from 'cli-progress';

import type { Logger } from '../../protocol/index.ts';
import { ErrorCode, FleetError } from '../../protocol/errors.ts';

/** Settings of one archive transfer. */
export interface TransferSettings {
  showProgress: boolean;
  connectTimeoutMs: number;
  idleTimeoutMs: number;
  progressIntervalMs: number;
  signal: AbortSignal | undefined;
  log: Logger;
}

/** Computes the MD5 of a file as lower-case hex. */
async function md5File(path: string): Promise<string> {
  const hash = createHash('md5');
  await pipeline(createReadStream(path), hash);
  return hash.digest('hex');
}

async function fileSize(path: string): Promise<number> {
  return existsSync(path) ? (await stat(path)).size : 0;
}

function createProgressBar(
  show: boolean,
  label: string,
): SingleBar | undefined {
  if (!show) return undefined;
  return new SingleBar({
    format: `${label} [{bar}] {percentage}% | {value}/{total} bytes`,
    stream: process.stderr,
  });
}

/**
 * Sends the GET request, resuming from `start` bytes with a Range header.
 * Aborts `transfer` when the response headers do not arrive within
 * `settings.connectTimeoutMs`.
 */
async function requestArchive(
  url: string,
  start: number,
  transfer: AbortController,
  settings: TransferSettings,
): Promise<Response> {
  const { connectTimeoutMs } = settings;
  let hasTimedOut = false;
  const timer = setTimeout(() => {
    hasTimedOut = true;
    transfer.abort();
  }, connectTimeoutMs);
  try {
    const headers: Record<string, string> =
      start > 0 ? { Range: `bytes=${start}-` } : {};
    return await fetch(url, { headers, signal: transfer.signal });
  } catch (err) {
    settings.signal?.throwIfAborted();
    if (hasTimedOut) {
      throw new FleetError(
        ErrorCode.DataNotFound,
        `download of ${url} timed out: no response headers within ` +
          `${connectTimeoutMs} ms (--connect-timeout-ms); check the network ` +
          `or pass --base-url with a reachable mirror`,
        { cause: err },
      );
    }
    const cause =
      err instanceof Error && err.cause instanceof Error ? err.cause : err;
    const reason = cause instanceof Error ? cause.message : String(cause);
    throw new FleetError(
      ErrorCode.DataNotFound,
      `download of ${url} failed: ${reason}; check the network or pass ` +
        `--base-url with a reachable mirror`,
      { cause: err },
    );
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Reports download progress: on the progress bar when there is one,
 * otherwise as a log line every `settings.progressIntervalMs`, so a run
 * whose output is not a terminal still shows that it is alive.
 */
function startProgress(
  url: string,
  partPath: string,
  settings: TransferSettings,
): { update(bytes: number, totalBytes: number): void; stop(): void } {
  const bar = createProgressBar(
    settings.showProgress,
    basename(partPath, '.part'),
  );
  let bytes = 0;
  let totalBytes = 0;
  let hasStarted = false;
  const interval = bar
    ? undefined
    : setInterval(() => {
        settings.log.info(
          { url, bytes, totalBytes },
          'archive download progress',
        );
      }, settings.progressIntervalMs);
  return {
    update(received: number, total: number): void {
      bytes = received;
      totalBytes = total;
      if (!hasStarted && total > 0) bar?.start(total, received);
      hasStarted = true;
      bar?.update(received);
    },
    stop(): void {
      clearInterval(interval);
      bar?.stop();
    },
  };
}

/**
 * Streams the response body to `partPath`, appending when `append`. The
 * transfer is aborted when no byte arrives for `settings.idleTimeoutMs`.
 *
 * @throws {FleetError} DATA_NOT_FOUND when the connection breaks or goes
 *   idle; the bytes on disk stay in `partPath` for the next run to resume.
 */
async function saveBody(
  url: string,
  response: Response,
  partPath: string,
  append: boolean,
  transfer: AbortController,
  settings: TransferSettings,
): Promise<void> {
  const { idleTimeoutMs } = settings;
  let received = append ? await fileSize(partPath) : 0;
  const length = Number(response.headers.get('content-length') ?? 0);
  const total = length > 0 ? received + length : 0;
  const progress = startProgress(url, partPath, settings);
  progress.update(received, total);
  let isIdle = false;
  const idleTimer = setTimeout(() => {
    isIdle = true;
    transfer.abort();
  }, idleTimeoutMs);
  const counter = new Transform({
    transform(chunk: Buffer, _encoding, callback) {
      idleTimer.refresh();
      received += chunk.length;
      progress.update(received, total);
      callback(null, chunk);
    },
  });

  try {
    await pipeline(
      Readable.fromWeb(response.body as WebReadableStream),
      counter,
      createWriteStream(partPath, { flags: append ? 'a' : 'w' }),
    );
  } catch (err) {
    settings.signal?.throwIfAborted();
    const onDisk = await fileSize(partPath);
    const reason = isIdle
      ? `timed out: no data for ${idleTimeoutMs} ms (--idle-timeout-ms)`
      : 'was interrupted';
    throw new FleetError(
      ErrorCode.DataNotFound,
      `download of ${url} ${reason}; ${partPath} contains ${onDisk} bytes, ` +
        `so run again to resume`,
      { cause: err },
    );
  } finally {
    clearTimeout(idleTimer);
    progress.stop();
  }
}

/** Returns true when `dest` exists with the expected MD5; deletes it otherwise. */
async function isVerified(
  dest: string,
  expectedMd5: string,
  log: Logger,
): Promise<boolean> {
  if (!existsSync(dest)) return false;
  const actualMd5 = await md5File(dest);
  if (actualMd5 === expectedMd5) return true;

  log.warn(
    { path: dest, expectedMd5, actualMd5 },
    'archive checksum mismatch, downloading again',
  );
  await rm(dest);
  return false;
}

/**
 * Fetches `url` into `partPath`, resuming from its current size with an
 * HTTP Range request. A server that ignores Range (status 200) restarts
 * the file.
 */
async function fetchToPart(
  url: string,
  partPath: string,
  settings: TransferSettings,
): Promise<void> {
  const start = await fileSize(partPath);
  const transfer = new AbortController();
  const onAbort = () => transfer.abort();
  settings.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    const response = await requestArchive(url, start, transfer, settings);
    await saveResponse(url, response, start, partPath, transfer, settings);
  } finally {
    settings.signal?.removeEventListener('abort', onAbort);
  }
}

/** Checks the status of `response` and saves its body to `partPath`. */
async function saveResponse(
  url: string,
  response: Response,
  start: number,
  partPath: string,
  transfer: AbortController,
  settings: TransferSettings,
): Promise<void> {
  if (response.status === 416 && start > 0) {
    // The server has no bytes past `start`, so the part file is complete.
    await response.body?.cancel();
    return;
  }
  const isResumed = response.status === 206;
  if (response.status !== 200 && !isResumed) {
    await response.body?.cancel();
    throw new FleetError(
      ErrorCode.DataNotFound,
      `download of ${url} failed: HTTP ${response.status} ` +
        `${response.statusText}; check --base-url`,
    );
  }

  settings.log.info(
    { url, resumeFromBytes: isResumed ? start : 0 },
    'archive download started',
  );
  await saveBody(url, response, partPath, isResumed, transfer, settings);
}

/**
 * Downloads one archive into `dest` unless a file with the expected MD5
 * is there. A partial download (`dest.part`) is resumed. The file is
 * renamed to `dest` only after its MD5 matches.
 *
 * @throws {FleetError} DATA_NOT_FOUND when the request fails or times
 *   out, DIGEST_MISMATCH when the downloaded file has another MD5.
 */
export async function downloadArchive(
  url: string,
  dest: string,
  expectedMd5: string,
  settings: TransferSettings,
): Promise<void> {
  const { log } = settings;
  if (await isVerified(dest, expectedMd5, log)) {
    log.info({ path: dest }, 'archive already downloaded');
    return;
  }

  const partPath = `${dest}.part`;
  await fetchToPart(url, partPath, settings);

  const actualMd5 = await md5File(partPath);
  if (actualMd5 !== expectedMd5) {
    await rm(partPath, { force: true });
    throw new FleetError(
      ErrorCode.DigestMismatch,
      `checksum mismatch for ${basename(dest)}: expected MD5 ${expectedMd5}, ` +
        `got ${actualMd5}; the download was deleted, so run again, or check ` +
        `--base-url and --checksums`,
    );
  }
  await rename(partPath, dest);
  log.info({ path: dest, bytes: await fileSize(dest) }, 'archive downloaded');
}
