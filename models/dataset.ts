/**
 * Labelled traffic-sign images from disk, in the model's input layout.
 *
 * Two directory layouts are read:
 * - GTSRB: `train/<5-digit class>/<track>_<frame>.ppm` with an optional
 *   `train.csv`, and `test/*.ppm` labelled by `test.csv`. The CSVs are
 *   semicolon-separated with a `Path` column (relative to the directory)
 *   or the official `Filename` column (relative to `train/` or `test/`),
 *   and a `ClassId` column.
 * - One folder per class: `<dir>/<class id>/*.{png,jpg,jpeg,ppm}`, where
 *   the folder name is the integer class id (`7` or `00007`).
 */
import { existsSync, statSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import {
  basename,
  dirname,
  extname,
  isAbsolute,
  join,
  relative,
  resolve,
  sep,
} from 'node:path';
import { fileURLToPath } from 'node:url';

import { parse } from 'csv-parse/sync';

import { ErrorCode, FleetError } from '../protocol/errors.ts';
import { NUM_CLASSES } from './architecture.ts';
import {
  decodeImageInto,
  IMAGE_EXTENSIONS,
  IMAGE_VALUES,
  readImageBytes,
} from './image-decode.ts';

export { decodeImageFile } from './image-decode.ts';
export { createRandom } from './random.ts';
export { dirichletSplit, splitByTrack, subset } from './data-split.ts';

/** Images with labels, as the training and evaluation code takes them. */
export interface LabelledImages {
  /** NHWC [count, 32, 32, 3], values in [0, 1]. */
  images: Float32Array;
  /** Class ids 0..42. */
  labels: Int32Array;
  count: number;
  /** Source file of each image. */
  paths: string[];
  /**
   * Physical sign track of each image, `<class folder>_<track>` (for
   * example `00014_00003`), or '' when unknown. Frames of one track are
   * near-duplicates, so splits keep a track on one side.
   */
  tracks: string[];
}

export interface LoadOptions {
  /** Half of a GTSRB-layout directory to read; default 'train'. */
  split?: 'train' | 'test';
  /**
   * Maximum number of images to read, evenly spaced over the file list
   * (CSV order, or folders and files sorted by name), so that every class
   * keeps about its share. Default: all.
   */
  limit?: number;
}

/** One image to load. */
interface ImageEntry {
  path: string;
  label: number;
  track: string;
}

const READ_CONCURRENCY = 32;
const DOWNLOAD_HINT =
  'run `npm run download-data` to fetch GTSRB, or pass a directory ' +
  'with --data or the FLEETLEARN_DATA environment variable';

function dataNotFound(message: string): FleetError {
  return new FleetError(ErrorCode.DataNotFound, `${message}; ${DOWNLOAD_HINT}`);
}

function isDirectory(path: string): boolean {
  return existsSync(path) && statSync(path).isDirectory();
}

/** Parses a class id from a CSV cell or folder name; rejects other values. */
function parseClassId(text: string, where: string): number {
  const id = /^\d{1,5}$/.test(text) ? Number(text) : NaN;
  if (!(id >= 0 && id < NUM_CLASSES)) {
    throw new FleetError(
      ErrorCode.DataNotFound,
      `invalid class id "${text}" in ${where}: expected an integer in ` +
        `0..${NUM_CLASSES - 1}`,
    );
  }
  return id;
}

/** Track id from `<class folder>/<track>_<frame>.<ext>`, or ''. */
function trackOf(path: string): string {
  const stem = basename(path, extname(path));
  const cut = stem.indexOf('_');
  if (cut <= 0) return '';
  return `${basename(dirname(path))}_${stem.slice(0, cut)}`;
}

function isImageFile(name: string): boolean {
  return IMAGE_EXTENSIONS.includes(extname(name).toLowerCase());
}

/** Lists `<dir>/<class>/<image>` entries, sorted by class then file name. */
async function listClassFolders(dir: string): Promise<ImageEntry[]> {
  const folders = (await readdir(dir, { withFileTypes: true }))
    .filter((entry) => entry.isDirectory() && !entry.name.startsWith('.'))
    .map((entry) => entry.name)
    .sort();

  const entries: ImageEntry[] = [];
  for (const folder of folders) {
    const label = parseClassId(folder, `folder name ${join(dir, folder)}`);
    const files = (await readdir(join(dir, folder))).filter(isImageFile).sort();
    for (const file of files) {
      const path = join(dir, folder, file);
      entries.push({ path, label, track: trackOf(path) });
    }
  }
  return entries;
}

/** Reads a GTSRB label CSV; image paths resolve inside `dir`. */
async function listFromCsv(
  dir: string,
  csvPath: string,
  splitDir: string,
): Promise<ImageEntry[]> {
  const rows: Record<string, string>[] = parse(await readFile(csvPath), {
    delimiter: ';',
    columns: true,
    skip_empty_lines: true,
    trim: true,
  });

  return rows.map((row, index) => {
    const where = `${csvPath} row ${index + 2}`;
    const relativePath =
      row.Path ?? (row.Filename && join(splitDir, row.Filename));
    if (!relativePath || row.ClassId === undefined) {
      throw new FleetError(
        ErrorCode.DataNotFound,
        `invalid label file ${where}: expected columns Path (or Filename) ` +
          `and ClassId separated by ';'`,
      );
    }
    const path = resolve(dir, relativePath);
    if (!isInside(dir, path)) {
      throw new FleetError(
        ErrorCode.DataNotFound,
        `invalid path "${relativePath}" in ${where}: it leaves ${dir}`,
      );
    }
    const label = parseClassId(row.ClassId, where);
    return { path, label, track: trackOf(path) };
  });
}

function isInside(dir: string, path: string): boolean {
  const rel = relative(dir, path);
  return (
    rel !== '' &&
    rel !== '..' &&
    !rel.startsWith(`..${sep}`) &&
    !isAbsolute(rel)
  );
}

function isGtsrbLayout(dir: string): boolean {
  return ['train', 'test', 'train.csv', 'test.csv'].some((name) =>
    existsSync(join(dir, name)),
  );
}

/** Lists the images of one split of a GTSRB-layout directory. */
async function listGtsrbSplit(
  dir: string,
  split: 'train' | 'test',
): Promise<ImageEntry[]> {
  const csvPath = join(dir, `${split}.csv`);
  if (existsSync(csvPath)) return listFromCsv(dir, csvPath, split);

  if (split === 'test') {
    throw dataNotFound(
      `no test labels in ${dir}: expected test.csv next to test/`,
    );
  }
  const trainDir = join(dir, 'train');
  if (!isDirectory(trainDir)) {
    throw dataNotFound(
      `no training images in ${dir}: expected train/ or train.csv`,
    );
  }
  return listClassFolders(trainDir);
}

/** Picks `limit` entries evenly spaced over the list, keeping order. */
function spreadLimit(
  entries: ImageEntry[],
  limit: number | undefined,
): ImageEntry[] {
  if (limit === undefined || limit >= entries.length) return entries;
  return Array.from(
    { length: limit },
    (_, i) => entries[Math.floor((i * entries.length) / limit)],
  );
}

function checkLoadOptions(options: LoadOptions): void {
  const { split, limit } = options;
  if (split !== undefined && split !== 'train' && split !== 'test') {
    throw new RangeError(
      `split must be 'train' or 'test', got ${String(split)}`,
    );
  }
  if (limit !== undefined && !(Number.isSafeInteger(limit) && limit > 0)) {
    throw new RangeError(`limit must be a positive integer, got ${limit}`);
  }
}

/** Runs `task` over 0..count-1 with at most `concurrency` in flight. */
async function forEachBounded(
  count: number,
  concurrency: number,
  task: (index: number) => Promise<void>,
): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < count) await task(next++);
  };
  await Promise.all(
    Array.from({ length: Math.min(concurrency, count) }, worker),
  );
}

/**
 * Loads labelled images from `dir` in the GTSRB layout or a folder per
 * class (see the module comment). In a GTSRB-layout directory `split`
 * picks train/ or test/; a folder-per-class directory is read as a whole.
 * Files are read with bounded concurrency; 32x32 PPMs are parsed in
 * JavaScript, everything else is decoded and resized by sharp.
 *
 * @throws {FleetError} DATA_NOT_FOUND when `dir` is missing, contains no
 *   images, or has a class id outside 0..42; INVALID_IMAGE naming the
 *   first file that cannot be decoded.
 * @throws {RangeError} for a bad `split` or `limit`.
 */
export async function loadLabelledImages(
  dir: string,
  options: LoadOptions = {},
): Promise<LabelledImages> {
  checkLoadOptions(options);
  const root = resolve(dir);
  if (!isDirectory(root)) {
    throw dataNotFound(`data directory ${root} does not exist`);
  }

  const split = options.split ?? 'train';
  const listed = isGtsrbLayout(root)
    ? await listGtsrbSplit(root, split)
    : await listClassFolders(root);
  if (listed.length === 0) {
    throw dataNotFound(
      `no images in ${root}: expected train/<class>/*.ppm with test.csv, ` +
        `or one folder per class id holding ${IMAGE_EXTENSIONS.join(', ')} files`,
    );
  }

  const entries = spreadLimit(listed, options.limit);
  const images = new Float32Array(entries.length * IMAGE_VALUES);
  await forEachBounded(entries.length, READ_CONCURRENCY, async (index) => {
    const { path } = entries[index];
    const bytes = await readImageBytes(path);
    await decodeImageInto(bytes, path, images, index * IMAGE_VALUES);
  });

  return {
    images,
    labels: Int32Array.from(entries, (entry) => entry.label),
    count: entries.length,
    paths: entries.map((entry) => entry.path),
    tracks: entries.map((entry) => entry.track),
  };
}

/** Repository root: this file lives in `<repo>/models/`. */
function repositoryRoot(): string {
  return resolve(dirname(fileURLToPath(import.meta.url)), '..');
}

/**
 * Returns the data directory to use. An explicit choice wins and must
 * exist: `flag` first, then the FLEETLEARN_DATA environment variable.
 * Without either, the first existing of `<repo>/data/gtsrb32-full`,
 * `<repo>/data/gtsrb32` and `<repo>/../shared/data/gtsrb32` is used.
 *
 * @throws {FleetError} DATA_NOT_FOUND listing every place looked at and
 *   how to get data.
 */
export function resolveDataDir(flag?: string): string {
  const env = process.env.FLEETLEARN_DATA;
  const explicit = flag ?? (env ? env : undefined);
  const source = flag !== undefined ? 'the data flag' : 'FLEETLEARN_DATA';
  const root = repositoryRoot();
  const candidates =
    explicit !== undefined
      ? [resolve(explicit)]
      : [
          // `npm run download-data` writes data/gtsrb32-full.
          join(root, 'data', 'gtsrb32-full'),
          join(root, 'data', 'gtsrb32'),
          resolve(root, '..', 'shared', 'data', 'gtsrb32'),
        ];

  const found = candidates.find(isDirectory);
  if (found !== undefined) return found;

  const looked =
    explicit !== undefined
      ? `${candidates[0]} (from ${source})`
      : candidates.join(', ');
  throw dataNotFound(`no data directory found; looked in ${looked}`);
}
