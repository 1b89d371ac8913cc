/**
 * Conversion of the official GTSRB zip archives into the gtsrb32 layout:
 * `train/<class>/<track>_<frame>.ppm`, `test/<nnnnn>.ppm` (32x32 binary
 * PPM), `train.csv` and `test.csv` with the columns
 * `Path;OrigWidth;OrigHeight;OrigRoi.X1;OrigRoi.Y1;OrigRoi.X2;OrigRoi.Y2;ClassId`.
 *
 * Entries are matched by name pattern, not by full path, so both official
 * training archives (`GTSRB/Training/...` and
 * `GTSRB/Final_Training/Images/...`) convert.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { buffer } from 'node:stream/consumers';

import { SingleBar } from 'cli-progress';
import { parse } from 'csv-parse/sync';
import yauzl from 'yauzl';

import { ErrorCode, FleetError } from '../protocol/errors.ts';
import { IMAGE_SIZE, NUM_CLASSES } from './architecture.ts';
import { CLASS_NAMES } from './class-names.ts';
import { resizeRgbTo32 } from './image-decode.ts';
import { encodePpm, parsePpm } from './ppm.ts';

/** Local paths of the three downloaded archives. */
export interface GtsrbArchivePaths {
  /** Training images with one GT-<class>.csv per class folder. */
  train: string;
  /** Test images (`<nnnnn>.ppm`). */
  testImages: string;
  /** Test ground truth (`GT-final_test.csv`). */
  testLabels: string;
}

/** Size of a converted image before resizing, and its CSV path. */
interface ConvertedImage {
  path: string;
  width: number;
  height: number;
}

type CsvRow = Record<string, string>;

const TRAIN_IMAGE = /(?:^|\/)(\d{5})\/(\d{5}_\d{5})\.ppm$/i;
const TRAIN_LABELS = /(?:^|\/)GT-(\d{5})\.csv$/i;
const TEST_IMAGE = /(?:^|\/)(\d{5})\.ppm$/i;
const TEST_LABELS = /(?:^|\/)GT-final_test\.csv$/i;
const CSV_HEADER =
  'Path;OrigWidth;OrigHeight;OrigRoi.X1;OrigRoi.Y1;OrigRoi.X2;OrigRoi.Y2;ClassId';
const CONVERT_CONCURRENCY = 8;

/** Runs async tasks with at most `limit` in flight; rethrows the first failure. */
class TaskPool {
  private readonly running = new Set<Promise<void>>();
  private failure: unknown;

  constructor(private readonly limit: number) {}

  async add(task: () => Promise<void>): Promise<void> {
    if (this.failure !== undefined) throw this.failure;
    const promise = task()
      .catch((err: unknown) => {
        this.failure ??= err;
      })
      .finally(() => this.running.delete(promise));
    this.running.add(promise);
    if (this.running.size >= this.limit) await Promise.race(this.running);
  }

  async drain(): Promise<void> {
    await Promise.all(this.running);
    if (this.failure !== undefined) throw this.failure;
  }

  /** Waits for the tasks in flight without throwing their failures. */
  async settle(): Promise<void> {
    await Promise.allSettled(this.running);
  }
}

/**
 * Wraps an error of yauzl or zlib (truncated file, bad signature, bad CRC)
 * in a FleetError that names the archive and what to do next.
 */
function archiveError(zipPath: string, err: unknown): unknown {
  if (err instanceof FleetError) return err;
  if (err instanceof Error && err.name === 'AbortError') return err;
  const reason = err instanceof Error ? err.message : String(err);
  return new FleetError(
    ErrorCode.DataNotFound,
    `invalid zip archive ${zipPath}: ${reason}. The file is truncated or ` +
      `not a zip even though its MD5 matched, so delete it and run the ` +
      `download again (with --force if the output directory exists), and ` +
      `check --base-url and --checksums if it fails again`,
    { cause: err },
  );
}

function parseGtCsv(text: Buffer, where: string): CsvRow[] {
  const rows: CsvRow[] = parse(text, {
    delimiter: ';',
    columns: true,
    skip_empty_lines: true,
    trim: true,
  });
  if (
    rows.length > 0 &&
    (rows[0].Filename === undefined || rows[0].ClassId === undefined)
  ) {
    throw new FleetError(
      ErrorCode.DataNotFound,
      `invalid annotation file ${where}: expected columns Filename and ClassId`,
    );
  }
  return rows;
}

/** Parses a source PPM, resizes it to 32x32 and writes it to `dest`. */
async function convertImage(
  bytes: Uint8Array,
  source: string,
  dest: string,
): Promise<{ width: number; height: number }> {
  let ppm;
  try {
    ppm = parsePpm(bytes);
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new FleetError(
      ErrorCode.InvalidImage,
      `invalid image ${source}: ${reason}`,
      {
        cause: err,
      },
    );
  }
  const isModelSize = ppm.width === IMAGE_SIZE && ppm.height === IMAGE_SIZE;
  const rgb = isModelSize
    ? ppm.rgb
    : await resizeRgbTo32(ppm.rgb, ppm.width, ppm.height);
  await writeFile(dest, encodePpm(IMAGE_SIZE, IMAGE_SIZE, rgb));
  return { width: ppm.width, height: ppm.height };
}

/** Reads the bytes of one entry, naming the archive when that fails. */
async function readEntry(
  zip: yauzl.ZipFile,
  entry: yauzl.Entry,
  zipPath: string,
): Promise<Buffer> {
  try {
    return await buffer(await zip.openReadStreamPromise(entry));
  } catch (err) {
    throw archiveError(zipPath, err);
  }
}

/** Yields the entries of a zip, naming the archive when reading fails. */
async function* zipEntries(
  zip: yauzl.ZipFile,
  zipPath: string,
): AsyncGenerator<yauzl.Entry> {
  try {
    yield* zip.eachEntry();
  } catch (err) {
    throw archiveError(zipPath, err);
  }
}

/**
 * Calls `onEntry` for each zip entry whose name matches `pattern`, with
 * the regex match and the entry's bytes, up to CONVERT_CONCURRENCY at once.
 * On failure or abort it waits for the tasks in flight before it throws,
 * so the caller can remove the output folder without a task recreating it.
 */
async function forEachMatchingEntry(
  zipPath: string,
  pattern: RegExp,
  onEntry: (
    match: RegExpExecArray,
    bytes: Buffer,
    name: string,
  ) => Promise<void>,
  bar: SingleBar | undefined,
  signal: AbortSignal | undefined,
): Promise<void> {
  signal?.throwIfAborted();
  const zip = await yauzl.openPromise(zipPath).catch((err: unknown) => {
    throw archiveError(zipPath, err);
  });
  const pool = new TaskPool(CONVERT_CONCURRENCY);
  bar?.start(zip.entryCount, 0);
  try {
    for await (const entry of zipEntries(zip, zipPath)) {
      signal?.throwIfAborted();
      bar?.increment();
      const match = pattern.exec(entry.fileName);
      if (match === null) continue;
      const bytes = await readEntry(zip, entry, zipPath);
      await pool.add(() =>
        onEntry(match, bytes, `${basename(zipPath)}:${entry.fileName}`),
      );
    }
    await pool.drain();
  } finally {
    await pool.settle();
    bar?.stop();
    zip.close();
  }
}

function csvLine(
  path: string,
  image: ConvertedImage,
  row: CsvRow,
  classId: number,
): string {
  const roi = [row['Roi.X1'], row['Roi.Y1'], row['Roi.X2'], row['Roi.Y2']];
  return [path, image.width, image.height, ...roi, classId].join(';');
}

function parseClass(text: string, where: string): number {
  const id = Number(text);
  if (!(Number.isInteger(id) && id >= 0 && id < NUM_CLASSES)) {
    throw new FleetError(
      ErrorCode.DataNotFound,
      `invalid class id "${text}" in ${where}: expected 0..${NUM_CLASSES - 1}`,
    );
  }
  return id;
}

/** Converts the training archive; returns the lines of train.csv. */
async function convertTraining(
  zipPath: string,
  outDir: string,
  bar: SingleBar | undefined,
  signal: AbortSignal | undefined,
): Promise<string[]> {
  const images = new Map<string, ConvertedImage>();
  const labels = new Map<string, CsvRow>();
  const pattern = new RegExp(
    `${TRAIN_IMAGE.source}|${TRAIN_LABELS.source}`,
    'i',
  );

  await forEachMatchingEntry(
    zipPath,
    pattern,
    async (match, bytes, name) => {
      const labelMatch = TRAIN_LABELS.exec(match[0]);
      if (labelMatch) {
        for (const row of parseGtCsv(bytes, name))
          labels.set(`${labelMatch[1]}/${row.Filename}`, row);
        return;
      }
      const [, classFolder, stem] = match;
      await mkdir(join(outDir, 'train', classFolder), { recursive: true });
      const path = `train/${classFolder}/${stem}.ppm`;
      const size = await convertImage(bytes, name, join(outDir, path));
      images.set(`${classFolder}/${stem}.ppm`, { path, ...size });
    },
    bar,
    signal,
  );

  if (images.size === 0) {
    throw new FleetError(
      ErrorCode.DataNotFound,
      `no training images in ${zipPath}: expected entries <class>/<track>_<frame>.ppm`,
    );
  }
  return [...images.keys()].sort().map((key) => {
    const row = labels.get(key);
    if (row === undefined) {
      throw new FleetError(
        ErrorCode.DataNotFound,
        `missing annotation for ${key} in GT-<class>.csv of ${zipPath}`,
      );
    }
    const image = images.get(key)!;
    return csvLine(image.path, image, row, parseClass(key.slice(0, 5), key));
  });
}

/** Converts the test archives; returns the lines of test.csv. */
async function convertTest(
  imagesZip: string,
  labelsZip: string,
  outDir: string,
  bar: SingleBar | undefined,
  signal: AbortSignal | undefined,
): Promise<string[]> {
  const images = new Map<string, ConvertedImage>();
  await mkdir(join(outDir, 'test'), { recursive: true });
  await forEachMatchingEntry(
    imagesZip,
    TEST_IMAGE,
    async (match, bytes, name) => {
      const path = `test/${match[1]}.ppm`;
      images.set(`${match[1]}.ppm`, {
        path,
        ...(await convertImage(bytes, name, join(outDir, path))),
      });
    },
    bar,
    signal,
  );

  let rows: CsvRow[] | undefined;
  await forEachMatchingEntry(
    labelsZip,
    TEST_LABELS,
    async (_match, bytes, name) => {
      rows = parseGtCsv(bytes, name);
    },
    undefined,
    signal,
  );
  if (rows === undefined) {
    throw new FleetError(
      ErrorCode.DataNotFound,
      `no GT-final_test.csv in ${labelsZip}`,
    );
  }

  const lines = rows.map((row) => {
    const image = images.get(row.Filename);
    if (image === undefined) {
      throw new FleetError(
        ErrorCode.DataNotFound,
        `test image ${row.Filename} named in GT-final_test.csv is missing from ${imagesZip}`,
      );
    }
    return csvLine(
      image.path,
      image,
      row,
      parseClass(row.ClassId, `GT-final_test.csv row ${row.Filename}`),
    );
  });
  if (lines.length !== images.size) {
    throw new FleetError(
      ErrorCode.DataNotFound,
      `${imagesZip} has ${images.size} test images but GT-final_test.csv labels ${lines.length}`,
    );
  }
  return lines;
}

/**
 * Converts the three GTSRB archives into `outDir` (which must not exist
 * yet or be empty): resized PPMs, train.csv, test.csv and signnames.csv.
 *
 * `options.signal` stops the conversion between entries. The call then
 * rejects with the signal's reason after the writes in flight finish.
 *
 * @throws {FleetError} DATA_NOT_FOUND for missing entries or labels or an
 *   archive that is not a readable zip, INVALID_IMAGE for an image that
 *   cannot be parsed.
 */
export async function convertGtsrbArchives(
  paths: GtsrbArchivePaths,
  outDir: string,
  options: { showProgress?: boolean; signal?: AbortSignal } = {},
): Promise<{ trainCount: number; testCount: number }> {
  const bar = options.showProgress
    ? new SingleBar({
        format: 'converting [{bar}] {value}/{total} entries',
        stream: process.stderr,
      })
    : undefined;
  await mkdir(outDir, { recursive: true });

  const { signal } = options;
  const trainLines = await convertTraining(paths.train, outDir, bar, signal);
  const testLines = await convertTest(
    paths.testImages,
    paths.testLabels,
    outDir,
    bar,
    signal,
  );

  await writeFile(
    join(outDir, 'train.csv'),
    [CSV_HEADER, ...trainLines, ''].join('\n'),
  );
  const names = CLASS_NAMES.map((name, id) => `${id};${name}`);
  await writeFile(
    join(outDir, 'signnames.csv'),
    ['ClassId;SignName', ...names, ''].join('\n'),
  );
  await writeFile(
    join(outDir, 'test.csv'),
    [CSV_HEADER, ...testLines, ''].join('\n'),
  );
  return { trainCount: trainLines.length, testCount: testLines.length };
}
