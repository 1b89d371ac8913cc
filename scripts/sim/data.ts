import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  dirichletSplit,
  loadLabelledImages,
  resolveDataDir,
  subset,
  type LabelledImages,
} from '../../models/index.ts';
import { ErrorCode, FleetError, type Logger } from '../../protocol/index.ts';

const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url));

/** Track ids the base model was trained on (see models/base/PROVENANCE.md). */
export const DEPOT_TRACKS_PATH = path.join(
  REPO_ROOT,
  'models/base/depot-tracks.json',
);

export interface FleetData {
  dataDir: string;
  test: LabelledImages;
  /** One share of the non-depot training images per vehicle. */
  shares: LabelledImages[];
  depotImagesRemoved: number;
}

function readDepotTracks(file: string): Set<string> {
  if (!existsSync(file)) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `depot track list ${file} is missing; it ships with the base model ` +
        '(npm run train-base-model writes it)',
    );
  }
  let tracks: unknown;
  try {
    tracks = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new FleetError(ErrorCode.InvalidModel, `${file} is not valid JSON`, {
      cause: err,
    });
  }
  if (!Array.isArray(tracks) || !tracks.every((t) => typeof t === 'string')) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `${file} must hold a JSON array of track ids`,
    );
  }
  return new Set(tracks);
}

/**
 * Loads the train and test splits, drops every image of a depot track (the
 * base model saw those signs, so vehicles must not), and splits the rest
 * over the vehicles with a seeded Dirichlet split over classes.
 */
export async function prepareFleetData(
  options: {
    dataDir?: string;
    depotTracksPath?: string;
    vehicles: number;
    alpha: number;
    seed: number;
  },
  log: Logger,
): Promise<FleetData> {
  const dataDir = resolveDataDir(options.dataDir);
  const started = Date.now();
  const train = await loadLabelledImages(dataDir, { split: 'train' });
  const test = await loadLabelledImages(dataDir, { split: 'test' });
  const depot = readDepotTracks(options.depotTracksPath ?? DEPOT_TRACKS_PATH);

  const vehicleIndices: number[] = [];
  for (let i = 0; i < train.count; i++) {
    if (!depot.has(train.tracks[i])) vehicleIndices.push(i);
  }
  const pool = subset(train, vehicleIndices);
  if (pool.count < options.vehicles) {
    throw new FleetError(
      ErrorCode.DataNotFound,
      `${dataDir} has ${pool.count} training images outside the depot ` +
        `split, fewer than the ${options.vehicles} vehicles requested`,
    );
  }
  const shares = dirichletSplit(
    pool,
    options.vehicles,
    options.alpha,
    options.seed,
  );
  log.info(
    {
      dataDir,
      trainImages: train.count,
      depotImagesRemoved: train.count - pool.count,
      testImages: test.count,
      durationMs: Date.now() - started,
      seed: options.seed,
    },
    'fleet data loaded',
  );
  return {
    dataDir,
    test,
    shares,
    depotImagesRemoved: train.count - pool.count,
  };
}

/** Concatenates the vehicles' shares, for the centralized baseline. */
export function unionOf(shares: LabelledImages[]): LabelledImages {
  let count = 0;
  for (const share of shares) count += share.count;
  const pixels = shares[0].images.length / shares[0].count;
  const images = new Float32Array(count * pixels);
  const labels = new Int32Array(count);
  const paths: string[] = [];
  const tracks: string[] = [];
  let offset = 0;
  for (const share of shares) {
    images.set(share.images, offset * pixels);
    labels.set(share.labels, offset);
    paths.push(...share.paths);
    tracks.push(...share.tracks);
    offset += share.count;
  }
  return { images, labels, count, paths, tracks };
}
