/**
 * Paths of the model store in an aggregator's state directory:
 * `<stateDir>/models/<modelName>/v<N>.{onnx,weights.pb,json,release.pb}`.
 * The aggregator's ModelStore writes these files; the registry reads and
 * prunes them, and keeps its own `pins.json` beside them.
 */
import path from 'node:path';

/** Files of one stored version, by kind. */
export type VersionFileKind = 'onnx' | 'weights.pb' | 'json' | 'release.pb';

/**
 * Kinds in the order a version's files are deleted: the manifest first,
 * so that a version stops counting as stored before any file is missing.
 */
export const VERSION_FILE_KINDS: readonly VersionFileKind[] = [
  'json',
  'release.pb',
  'onnx',
  'weights.pb',
];

/** Folder of the versions of `modelName`. */
export function modelDirOf(stateDir: string, modelName: string): string {
  return path.join(stateDir, 'models', modelName);
}

/** Path of one file of `version` in `modelDir`. */
export function versionFileOf(
  modelDir: string,
  version: number,
  kind: VersionFileKind,
): string {
  return path.join(modelDir, `v${version}.${kind}`);
}

/** Returns the version a manifest file name stands for, or undefined. */
export function versionOfManifestName(name: string): number | undefined {
  const match = /^v(\d+)\.json$/.exec(name);
  return match === null ? undefined : Number(match[1]);
}
