/** File writing for provisioning: private keys 0600, folders 0700. */
import { chmodSync, mkdirSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';

/** Creates `folder` and its parents; a new folder gets mode 0700. */
export function ensurePrivateFolder(folder: string): void {
  mkdirSync(folder, { recursive: true, mode: 0o700 });
}

/**
 * Writes `contents` through a temporary file in the same folder and a
 * rename, so a reader sees the old or the new file, never half of one.
 * The file gets `mode` even when it existed with another one.
 */
export function writeFileAtomic(
  file: string,
  contents: string,
  mode: number,
): void {
  ensurePrivateFolder(path.dirname(file));
  const temporary = `${file}.${process.pid}.tmp`;
  writeFileSync(temporary, contents, { mode });
  // writeFileSync applies the process umask; chmod sets the exact mode.
  chmodSync(temporary, mode);
  renameSync(temporary, file);
}

/** Writes a private key with mode 0600. */
export function writePrivateKey(file: string, pem: string): void {
  writeFileAtomic(file, pem, 0o600);
}

/** Writes a certificate, CRL or configuration with mode 0644. */
export function writePublicFile(file: string, contents: string): void {
  writeFileAtomic(file, contents, 0o644);
}
