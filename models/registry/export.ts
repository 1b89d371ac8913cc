/**
 * Export of one stored version to a folder of its own: the ONNX file, the
 * manifest, the signed release notice when one was kept, and SHA256SUMS.
 */
import { randomBytes } from 'node:crypto';
import {
  existsSync,
  mkdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import path from 'node:path';
import { ErrorCode, FleetError } from '../../protocol/index.ts';
import { sha256Hex } from '../runtime.ts';
import { describeFileError } from './file-errors.ts';
import type { ModelRegistry } from './store.ts';
import { readOnnx } from './version-files.ts';

/** Result of {@link exportVersion}. */
export interface ExportedVersion {
  version: number;
  dir: string;
  /** Names of the files in `dir`, SHA256SUMS last. */
  files: string[];
  signed: boolean;
}

/**
 * Writes version `version` to the new folder `outDir`. The files go to a
 * temporary sibling folder first, which is renamed to `outDir` once
 * complete, so `outDir` never exists half written. The ONNX file is
 * checked against the manifest's digest before anything is written.
 *
 * NOTE: rename(2) replaces an empty folder, so an empty folder created at
 * `outDir` after the existence check is replaced. A non-empty one makes
 * the rename fail.
 *
 * @throws {FleetError} INVALID_CONFIG when `outDir` is empty, exists or
 *   cannot be created (naming the path and the reason), INVALID_MODEL
 *   when the version is not stored or its ONNX file does not match its
 *   manifest.
 */
export function exportVersion(
  registry: ModelRegistry,
  version: number,
  outDir: string,
): ExportedVersion {
  if (outDir.trim() === '') {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      'export folder is an empty path; --out must name a new folder',
    );
  }
  if (existsSync(outDir)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `export folder ${outDir} already exists; choose another --out or ` +
        'remove it first',
    );
  }
  const onnx = readOnnx(registry, version);
  const contents = new Map<string, Uint8Array>([
    [`${registry.modelName}-v${version}.onnx`, onnx],
    ['manifest.json', readFileSync(registry.pathOf(version, 'json'))],
  ]);
  const signed = registry.signature(version) !== null;
  if (signed) {
    contents.set(
      'release.pb',
      readFileSync(registry.pathOf(version, 'release.pb')),
    );
  }
  const sums = [...contents].map(
    ([name, bytes]) => `${sha256Hex(bytes)}  ${name}\n`,
  );
  contents.set('SHA256SUMS', Buffer.from(sums.join('')));

  const parent = path.dirname(path.resolve(outDir));
  createParent(outDir, parent);
  const temporary = path.join(
    parent,
    `.${path.basename(outDir)}.${randomBytes(6).toString('hex')}.partial`,
  );
  try {
    mkdirSync(temporary);
    for (const [name, bytes] of contents) {
      writeFileSync(path.join(temporary, name), bytes, { flush: true });
    }
    renameSync(temporary, outDir);
  } catch (err) {
    rmSync(temporary, { recursive: true, force: true });
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `cannot create export folder ${outDir} in ${parent}: ` +
        describeFileError(err),
      { cause: err },
    );
  }
  return { version, dir: outDir, files: [...contents.keys()], signed };
}

/**
 * Creates the missing folders above the export folder. A file on the
 * way gets its own message, because mkdir reports it as EEXIST or
 * ENOTDIR without saying which path is the file.
 */
function createParent(outDir: string, parent: string): void {
  let existing = parent;
  while (!existsSync(existing) && path.dirname(existing) !== existing) {
    existing = path.dirname(existing);
  }
  if (existsSync(existing) && !statSync(existing).isDirectory()) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `cannot create export folder ${outDir}: ${existing} is a file, not ` +
        'a folder',
    );
  }
  try {
    mkdirSync(parent, { recursive: true });
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `cannot create the folder ${parent} for export folder ${outDir}: ` +
        describeFileError(err),
      { cause: err },
    );
  }
}
