/**
 * Checks the bench makes before it measures anything, so that a bad data
 * folder or JSON path fails in a second instead of after the whole run.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { loadLabelledImages, resolveDataDir } from '../../models/index.ts';
import { describeFileError } from '../../models/registry/index.ts';
import { ErrorCode, FleetError } from '../../protocol/index.ts';

/**
 * Returns the data folder for `flag` (see resolveDataDir) after reading
 * one image of each split, which checks the layout the measurements use.
 *
 * @throws {FleetError} DATA_NOT_FOUND naming the folder, INVALID_IMAGE
 *   naming a file that does not decode.
 */
export async function checkDataDir(flag: string | undefined): Promise<string> {
  const dataDir = resolveDataDir(flag);
  await loadLabelledImages(dataDir, { split: 'test', limit: 1 });
  await loadLabelledImages(dataDir, { split: 'train', limit: 1 });
  return dataDir;
}

/**
 * Checks that `file` can be written later: it is not a folder, and a
 * probe file can be created and removed beside it. A probe is used
 * because access(2) reports every folder as writable to root, /proc
 * included.
 *
 * @throws {FleetError} INVALID_CONFIG naming the path and the reason.
 */
export function checkJsonPath(file: string): void {
  const folder = path.dirname(path.resolve(file));
  const fail = (reason: string): never => {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `cannot write the JSON report ${file}: ${reason}`,
    );
  };
  if (existsSync(file) && statSync(file).isDirectory()) {
    fail('it is a folder');
  }
  if (!existsSync(folder)) fail(`folder ${folder} does not exist`);
  if (!statSync(folder).isDirectory()) fail(`${folder} is not a folder`);
  const probe = path.join(
    folder,
    `.bench-probe-${process.pid}-${randomBytes(4).toString('hex')}`,
  );
  try {
    writeFileSync(probe, '');
  } catch (err) {
    fail(`folder ${folder} is not writable (${describeFileError(err)})`);
  }
  rmSync(probe, { force: true });
}
