/**
 * Downloads the official GTSRB archives and converts them into the
 * gtsrb32 layout that `loadLabelledImages` reads:
 * `train/<class>/<track>_<frame>.ppm` and `test/<nnnnn>.ppm` (32x32 binary
 * PPM, the whole crop resized with bilinear interpolation), `train.csv`,
 * `test.csv` and `signnames.csv`.
 *
 * Usage: npx tsx scripts/download-gtsrb.ts [--out DIR] [--base-url URL]
 *   [--download-dir DIR] [--checksums FILE] [--force]
 *   [--connect-timeout-ms MS] [--idle-timeout-ms MS]
 */
import { existsSync } from 'node:fs';
import {
  mkdir,
  readdir,
  readFile,
  rename,
  rm,
  writeFile,
} from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

import { Command, InvalidArgumentError } from 'commander';

import { convertGtsrbArchives } from '../models/gtsrb-convert.ts';
import { createLogger, type Logger } from '../protocol/index.ts';
import { ErrorCode, FleetError } from '../protocol/errors.ts';
import { abortOnSignals } from './download/signals.ts';
import { downloadArchive, type TransferSettings } from './download/transfer.ts';

/**
 * Host and archives of the official GTSRB release, with their MD5 sums,
 * as torchvision's `torchvision/datasets/gtsrb.py` downloads them
 * (pytorch/vision, `GTSRB.download`).
 */
export const OFFICIAL_BASE_URL =
  'https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/';
export const GTSRB_ARCHIVES = {
  train: {
    name: 'GTSRB-Training_fixed.zip',
    md5: '513f3c79a4c5141765e10e952eaa2478',
  },
  testImages: {
    name: 'GTSRB_Final_Test_Images.zip',
    md5: 'c7e4e6327067d32654124b0fe9e82185',
  },
  testLabels: {
    name: 'GTSRB_Final_Test_GT.zip',
    md5: 'fe31e9c9270bbcd7b84b7f21a9d9d9e5',
  },
} as const;

type ArchiveRole = keyof typeof GTSRB_ARCHIVES;

const REPOSITORY_ROOT = resolve(fileURLToPath(import.meta.url), '..', '..');

export interface DownloadGtsrbOptions {
  /** Directory of the converted dataset; default `<repo>/data/gtsrb32-full`. */
  outDir?: string;
  /** Directory of the downloaded archives; default `<repo>/data/downloads`. */
  downloadDir?: string;
  /** URL prefix of the three archives; default the official host. */
  baseUrl?: string;
  /** Expected MD5 per archive file name, replacing the built-in sums. */
  checksums?: Record<string, string>;
  /** Replace an existing output directory instead of keeping it. */
  force?: boolean;
  /** Draw progress bars on stderr; default: when stderr is a terminal. */
  showProgress?: boolean;
  /** Time allowed to connect and receive response headers; default 30000. */
  connectTimeoutMs?: number;
  /** Time without a received byte before a download fails; default 30000. */
  idleTimeoutMs?: number;
  /**
   * Interval of the progress log lines written when no progress bar is
   * drawn; default 5000 ms.
   */
  progressIntervalMs?: number;
  /**
   * Stops the run. A partial download stays for the next run to resume,
   * and a partial dataset folder is removed before the call rejects.
   */
  signal?: AbortSignal;
  log?: Logger;
}

const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_PROGRESS_INTERVAL_MS = 5_000;

export interface DownloadGtsrbResult {
  outDir: string;
  trainCount: number;
  testCount: number;
  /** True when the output existed and nothing was converted. */
  wasPresent: boolean;
}

/** Resolves the expected MD5 of each archive, applying `overrides`. */
function expectedChecksums(
  overrides: Record<string, string> = {},
): Record<ArchiveRole, string> {
  const names = Object.values(GTSRB_ARCHIVES).map(
    (archive) => archive.name as string,
  );
  for (const [name, md5] of Object.entries(overrides)) {
    if (!names.includes(name)) {
      throw new RangeError(
        `checksum for unknown archive "${name}": expected one of ${names.join(', ')}`,
      );
    }
    if (typeof md5 !== 'string' || !/^[0-9a-f]{32}$/i.test(md5)) {
      throw new RangeError(
        `checksum for ${name} must be 32 hex digits of MD5, got ${String(md5)}`,
      );
    }
  }
  const sums = {} as Record<ArchiveRole, string>;
  for (const role of Object.keys(GTSRB_ARCHIVES) as ArchiveRole[]) {
    const { name, md5 } = GTSRB_ARCHIVES[role];
    sums[role] = (overrides[name] ?? md5).toLowerCase();
  }
  return sums;
}

/**
 * Downloads the three GTSRB archives (skipping verified ones, resuming
 * partial ones) and converts them into `outDir`. The dataset is written to
 * a temporary sibling folder and renamed into place when complete, so a
 * failed run leaves no half-written dataset. An existing `outDir` is kept
 * unless `force` is set.
 *
 * @throws {FleetError} DATA_NOT_FOUND for a failed download or an archive
 *   without the expected files, DIGEST_MISMATCH for a wrong checksum,
 *   INVALID_IMAGE for an image that cannot be decoded.
 */
export async function downloadGtsrb(
  options: DownloadGtsrbOptions = {},
): Promise<DownloadGtsrbResult> {
  const outDir = resolve(
    options.outDir ?? join(REPOSITORY_ROOT, 'data', 'gtsrb32-full'),
  );
  const downloadDir = resolve(
    options.downloadDir ?? join(REPOSITORY_ROOT, 'data', 'downloads'),
  );
  const baseUrl = (options.baseUrl ?? OFFICIAL_BASE_URL).replace(/\/?$/, '/');
  const log = (options.log ?? createLogger()).child({ component: 'download' });
  const settings = transferSettings(options, log);
  const sums = expectedChecksums(options.checksums);

  await removeStaleFolders(outDir, log);
  if (existsSync(outDir) && !options.force) {
    log.info({ path: outDir }, 'dataset already present');
    return { outDir, trainCount: 0, testCount: 0, wasPresent: true };
  }

  await mkdir(downloadDir, { recursive: true });
  const paths = {} as Record<ArchiveRole, string>;
  for (const role of Object.keys(GTSRB_ARCHIVES) as ArchiveRole[]) {
    const { name } = GTSRB_ARCHIVES[role];
    paths[role] = join(downloadDir, name);
    await downloadArchive(
      new URL(name, baseUrl).href,
      paths[role],
      sums[role],
      settings,
    );
  }

  const tempDir = `${outDir}.partial-${process.pid}`;
  await rm(tempDir, { recursive: true, force: true });
  try {
    const startedAt = performance.now();
    log.info({ path: tempDir }, 'dataset conversion started');
    const counts = await convertGtsrbArchives(paths, tempDir, {
      showProgress: settings.showProgress,
      signal: settings.signal,
    });
    await writeSourceNote(tempDir, baseUrl, sums);
    await replaceDirectory(tempDir, outDir);
    log.info(
      {
        path: outDir,
        ...counts,
        durationMs: Math.round(performance.now() - startedAt),
      },
      'dataset converted',
    );
    return { outDir, ...counts, wasPresent: false };
  } catch (err) {
    await rm(tempDir, { recursive: true, force: true });
    log.info({ path: tempDir }, 'partial dataset removed');
    throw err;
  }
}

function positiveMs(value: number | undefined, name: string): number {
  if (value === undefined) return DEFAULT_TIMEOUT_MS;
  if (!(Number.isInteger(value) && value > 0)) {
    throw new RangeError(
      `${name} must be a positive integer of milliseconds, got ${value}`,
    );
  }
  return value;
}

/** Checks the timeout options and fills in their defaults. */
function transferSettings(
  options: DownloadGtsrbOptions,
  log: Logger,
): TransferSettings {
  return {
    showProgress: options.showProgress ?? process.stderr.isTTY === true,
    connectTimeoutMs: positiveMs(options.connectTimeoutMs, 'connectTimeoutMs'),
    idleTimeoutMs: positiveMs(options.idleTimeoutMs, 'idleTimeoutMs'),
    progressIntervalMs:
      options.progressIntervalMs === undefined
        ? DEFAULT_PROGRESS_INTERVAL_MS
        : positiveMs(options.progressIntervalMs, 'progressIntervalMs'),
    signal: options.signal,
    log,
  };
}

/** Returns false when no process with `pid` exists. */
function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM means the process exists but belongs to another user.
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Removes `<outDir>.partial-<pid>` folders left by runs that were killed,
 * when no process with that pid is alive.
 * NOTE: the folder of a dead run whose pid a new, unrelated process
 * reuses stays until a later run.
 */
async function removeStaleFolders(outDir: string, log: Logger): Promise<void> {
  const parent = dirname(outDir);
  if (!existsSync(parent)) return;
  const prefix = `${basename(outDir)}.partial-`;
  for (const name of await readdir(parent)) {
    if (!name.startsWith(prefix)) continue;
    const pid = Number(name.slice(prefix.length));
    if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid) continue;
    if (isProcessAlive(pid)) continue;
    await rm(join(parent, name), { recursive: true, force: true });
    log.info(
      { path: join(parent, name), pid },
      'stale partial dataset removed',
    );
  }
}

async function writeSourceNote(
  dir: string,
  baseUrl: string,
  sums: Record<ArchiveRole, string>,
): Promise<void> {
  const archives = (Object.keys(GTSRB_ARCHIVES) as ArchiveRole[]).map(
    (role) => `- ${GTSRB_ARCHIVES[role].name} (MD5 ${sums[role]})`,
  );
  const source = [
    '# GTSRB resized to 32x32',
    '',
    'German Traffic Sign Recognition Benchmark (J. Stallkamp, M. Schlipsing,',
    'J. Salmen, C. Igel, Neural Networks 32 (2012) 323-332), converted by',
    'scripts/download-gtsrb.ts: each whole crop resized to 32x32 with',
    'bilinear interpolation (sharp), stored as binary PPM.',
    '',
    `Downloaded from ${baseUrl}:`,
    ...archives,
    '',
  ];
  await writeFile(join(dir, 'SOURCE.md'), source.join('\n'));
}

/** Renames `from` to `to`, moving an existing `to` aside first. */
async function replaceDirectory(from: string, to: string): Promise<void> {
  const old = `${to}.old-${process.pid}`;
  const hadOld = existsSync(to);
  if (hadOld) await rename(to, old);
  await rename(from, to);
  if (hadOld) await rm(old, { recursive: true, force: true });
}

async function readChecksumsFile(
  path: string,
): Promise<Record<string, string>> {
  try {
    return JSON.parse(await readFile(path, 'utf8')) as Record<string, string>;
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `cannot read checksums file ${path}: expected JSON mapping archive file names to MD5 hex`,
      { cause: err },
    );
  }
}

function parseMs(value: string): number {
  const ms = Number(value);
  if (!(Number.isInteger(ms) && ms > 0)) {
    throw new InvalidArgumentError(
      `expected a positive integer of milliseconds, got "${value}"`,
    );
  }
  return ms;
}

async function main(argv: string[]): Promise<void> {
  const program = new Command()
    .name('download-gtsrb')
    .description(
      'Download GTSRB and convert it to 32x32 PPMs in the gtsrb32 layout.',
    )
    .option(
      '--out <dir>',
      'output dataset directory',
      join(REPOSITORY_ROOT, 'data', 'gtsrb32-full'),
    )
    .option(
      '--download-dir <dir>',
      'where the archives are kept',
      join(REPOSITORY_ROOT, 'data', 'downloads'),
    )
    .option(
      '--base-url <url>',
      'URL prefix of the three archives (a mirror)',
      OFFICIAL_BASE_URL,
    )
    .option(
      '--checksums <file>',
      'JSON file mapping archive file names to expected MD5 hex',
    )
    .option('--force', 'replace an existing output directory', false)
    .option(
      '--connect-timeout-ms <ms>',
      'time allowed to connect and receive response headers, in ms',
      parseMs,
      DEFAULT_TIMEOUT_MS,
    )
    .option(
      '--idle-timeout-ms <ms>',
      'time without a received byte before a download fails, in ms',
      parseMs,
      DEFAULT_TIMEOUT_MS,
    )
    .option(
      '--progress-interval-ms <ms>',
      'interval of progress log lines when stderr is not a terminal, in ms',
      parseMs,
      DEFAULT_PROGRESS_INTERVAL_MS,
    )
    .parse(argv);
  const opts = program.opts<{
    out: string;
    downloadDir: string;
    baseUrl: string;
    checksums?: string;
    force: boolean;
    connectTimeoutMs: number;
    idleTimeoutMs: number;
    progressIntervalMs: number;
  }>();

  const checksums = opts.checksums
    ? await readChecksumsFile(opts.checksums)
    : undefined;
  const controller = new AbortController();
  const signals = abortOnSignals(controller);
  try {
    await downloadGtsrb({
      outDir: opts.out,
      downloadDir: opts.downloadDir,
      baseUrl: opts.baseUrl,
      checksums,
      force: opts.force,
      connectTimeoutMs: opts.connectTimeoutMs,
      idleTimeoutMs: opts.idleTimeoutMs,
      progressIntervalMs: opts.progressIntervalMs,
      signal: controller.signal,
    });
  } catch (err) {
    const signal = signals.received();
    if (signal === undefined) throw err;
    signals.dispose();
    process.stderr.write(
      `download-gtsrb: stopped by ${signal}; downloaded parts are kept ` +
        `for the next run to resume\n`,
    );
    // Ends by the signal itself, so a calling shell gets the signal status.
    process.kill(process.pid, signal);
  } finally {
    signals.dispose();
  }
}

if (
  process.argv[1] &&
  import.meta.url === pathToFileURL(resolve(process.argv[1])).href
) {
  main(process.argv).catch((err: unknown) => {
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(`download-gtsrb: ${message}\n`);
    process.exitCode = 1;
  });
}
