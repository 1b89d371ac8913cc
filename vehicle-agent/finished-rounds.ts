/**
 * Rounds for which this vehicle has stored an update, kept in a small file
 * so that an agent restarted while the round is still open does not train
 * it again.
 */
import { readFileSync } from 'node:fs';
import type { Logger } from '../protocol/index.ts';
import { writeFileAtomic } from './model-files.ts';

/** Rounds remembered; older ones are long closed. */
const MAX_ROUNDS = 64;

export class FinishedRounds {
  readonly #file: string;
  readonly #keys: string[];

  /**
   * Reads `file` if it exists. A file that cannot be read or parsed is
   * logged and treated as empty, so at worst a round is trained again
   * and its second update is rejected as a duplicate.
   */
  constructor(file: string, log: Logger) {
    this.#file = file;
    this.#keys = readKeys(file, log);
  }

  has(key: string): boolean {
    return this.#keys.includes(key);
  }

  /** Records `key` and writes the file atomically. */
  async add(key: string): Promise<void> {
    if (this.has(key)) return;
    this.#keys.push(key);
    if (this.#keys.length > MAX_ROUNDS) this.#keys.shift();
    await writeFileAtomic(this.#file, JSON.stringify(this.#keys) + '\n');
  }
}

function readKeys(file: string, log: Logger): string[] {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    log.warn({ err, file }, 'finished rounds file not readable, ignored');
    return [];
  }
  try {
    const keys: unknown = JSON.parse(text);
    if (Array.isArray(keys) && keys.every((key) => typeof key === 'string')) {
      return keys.slice(-MAX_ROUNDS);
    }
  } catch {
    // Reported below like any other unexpected content.
  }
  log.warn(
    { file },
    'finished rounds file is not a list of round keys, ignored',
  );
  return [];
}
