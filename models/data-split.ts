/**
 * Seeded splits of labelled images that keep each physical sign track on
 * one side, so that near-duplicate frames never leak between splits.
 * Images with an unknown track ('') count as tracks of one image.
 */
import { IMAGE_CHANNELS, IMAGE_SIZE } from './architecture.ts';
import type { LabelledImages } from './dataset.ts';
import { createRandom, sampleDirichlet, shuffleInPlace } from './random.ts';

/** The images of one track (or one image whose track is unknown). */
interface TrackGroup {
  label: number;
  indices: number[];
}

const IMAGE_VALUES = IMAGE_SIZE * IMAGE_SIZE * IMAGE_CHANNELS;

/**
 * Copies the images at `indices` (in that order) into a new LabelledImages.
 *
 * @throws {RangeError} when an index is not an integer in 0..count-1.
 */
export function subset(
  data: LabelledImages,
  indices: number[],
): LabelledImages {
  const images = new Float32Array(indices.length * IMAGE_VALUES);
  const labels = new Int32Array(indices.length);
  indices.forEach((index, i) => {
    if (!Number.isInteger(index) || index < 0 || index >= data.count) {
      throw new RangeError(
        `subset index ${index} is out of range: expected an integer in ` +
          `0..${data.count - 1}`,
      );
    }
    const start = index * IMAGE_VALUES;
    images.set(
      data.images.subarray(start, start + IMAGE_VALUES),
      i * IMAGE_VALUES,
    );
    labels[i] = data.labels[index];
  });

  return {
    images,
    labels,
    count: indices.length,
    paths: indices.map((index) => data.paths[index]),
    tracks: indices.map((index) => data.tracks[index]),
  };
}

/**
 * Groups image indices by track, in order of first appearance. A track id
 * is class-specific in GTSRB, so a group takes the label of its first image.
 */
function groupByTrack(data: LabelledImages): TrackGroup[] {
  const groups: TrackGroup[] = [];
  const byTrack = new Map<string, TrackGroup>();
  for (let i = 0; i < data.count; i++) {
    const track = data.tracks[i];
    let group = track === '' ? undefined : byTrack.get(track);
    if (group === undefined) {
      group = { label: data.labels[i], indices: [] };
      groups.push(group);
      if (track !== '') byTrack.set(track, group);
    }
    group.indices.push(i);
  }
  return groups;
}

/** Groups the track groups by class label, in ascending label order. */
function groupsPerClass(groups: TrackGroup[]): TrackGroup[][] {
  const byClass = new Map<number, TrackGroup[]>();
  for (const group of groups) {
    const list = byClass.get(group.label) ?? [];
    list.push(group);
    byClass.set(group.label, list);
  }
  return [...byClass.keys()]
    .sort((a, b) => a - b)
    .map((label) => byClass.get(label)!);
}

function sortedIndices(groups: TrackGroup[]): number[] {
  return groups.flatMap((group) => group.indices).sort((a, b) => a - b);
}

/**
 * Splits `data` into `selected` (about `fraction` of the tracks) and
 * `rest`, keeping every track whole. The draw is stratified by class:
 * each class gives round(fraction * its track count) tracks, chosen by a
 * seeded shuffle, so both sides keep the class mix. Images keep their
 * original order within each side.
 *
 * @throws {RangeError} when `fraction` is outside [0, 1] or `seed` is not
 *   a safe integer.
 */
export function splitByTrack(
  data: LabelledImages,
  fraction: number,
  seed: number,
): { selected: LabelledImages; rest: LabelledImages } {
  if (!(fraction >= 0 && fraction <= 1)) {
    throw new RangeError(`fraction must be in [0, 1], got ${fraction}`);
  }
  const random = createRandom(seed);

  const selected: TrackGroup[] = [];
  const rest: TrackGroup[] = [];
  for (const classGroups of groupsPerClass(groupByTrack(data))) {
    shuffleInPlace(classGroups, random);
    const take = Math.round(fraction * classGroups.length);
    selected.push(...classGroups.slice(0, take));
    rest.push(...classGroups.slice(take));
  }

  return {
    selected: subset(data, sortedIndices(selected)),
    rest: subset(data, sortedIndices(rest)),
  };
}

/**
 * Gives each track of one class to a part. The tracks, in shuffled order,
 * fill the parts one after another in proportion to `shares` (measured in
 * images): a track goes to the part whose cumulative share covers the
 * midpoint of its images.
 */
function allocateClass(
  classGroups: TrackGroup[],
  shares: number[],
  assigned: TrackGroup[][],
): void {
  const total = classGroups.reduce((sum, g) => sum + g.indices.length, 0);
  let seen = 0;
  for (const group of classGroups) {
    const midpoint = (seen + group.indices.length / 2) / total;
    seen += group.indices.length;
    let part = 0;
    let cumulative = shares[0];
    while (part < shares.length - 1 && cumulative <= midpoint) {
      part++;
      cumulative += shares[part];
    }
    assigned[part].push(group);
  }
}

/**
 * Moves tracks into empty parts, each time taking the last-assigned track
 * of the part that contains the most tracks, until no part is empty.
 */
function fillEmptyParts(assigned: TrackGroup[][]): void {
  for (const part of assigned) {
    if (part.length > 0) continue;
    const donor = assigned.reduce((a, b) => (b.length > a.length ? b : a));
    part.push(donor.pop()!);
  }
}

/**
 * Splits `data` into `parts` non-IID shards, the Dirichlet partition common
 * in federated-learning benchmarks. For each class, proportions over the
 * parts are drawn from a symmetric Dirichlet(alpha), and the class's tracks
 * are dealt out in those proportions, whole tracks only. Small alpha (0.1)
 * gives each part few classes, and large alpha (100) approaches an IID
 * split. A part left empty receives a track from the part that contains
 * the most tracks, so every part is non-empty. Equal seeds give equal
 * splits.
 *
 * @throws {RangeError} when `parts` is not a positive integer, `alpha` is
 *   not positive and finite, or there are fewer tracks than parts.
 */
export function dirichletSplit(
  data: LabelledImages,
  parts: number,
  alpha: number,
  seed: number,
): LabelledImages[] {
  if (!(Number.isSafeInteger(parts) && parts > 0)) {
    throw new RangeError(`parts must be a positive integer, got ${parts}`);
  }
  if (!(alpha > 0 && Number.isFinite(alpha))) {
    throw new RangeError(`alpha must be a positive number, got ${alpha}`);
  }
  const random = createRandom(seed);
  const groups = groupByTrack(data);
  if (groups.length < parts) {
    throw new RangeError(
      `cannot split ${groups.length} tracks into ${parts} non-empty parts: ` +
        `use at most ${groups.length} parts`,
    );
  }

  const assigned: TrackGroup[][] = Array.from({ length: parts }, () => []);
  for (const classGroups of groupsPerClass(groups)) {
    shuffleInPlace(classGroups, random);
    allocateClass(classGroups, sampleDirichlet(parts, alpha, random), assigned);
  }
  fillEmptyParts(assigned);

  return assigned.map((partGroups) => subset(data, sortedIndices(partGroups)));
}
