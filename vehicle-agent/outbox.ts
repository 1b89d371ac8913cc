/**
 * On-disk outbox of encoded ModelUpdates awaiting their ack, so that an
 * update survives a crash or restart of the agent and is sent again.
 */
import { randomBytes } from 'node:crypto';
import {
  mkdir,
  open,
  readFile,
  readdir,
  rename,
  rm,
  stat,
} from 'node:fs/promises';
import path from 'node:path';
import { decodeUpdatePayload, type Logger } from '../protocol/index.ts';

/** File name suffix of an outbox entry. */
const ENTRY_SUFFIX = '.pb';
/** Update ids become file names, so they are limited to these characters. */
const UPDATE_ID_PATTERN = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;

/** An update in the outbox. */
export interface OutboxEntry {
  updateId: string;
  /** Round named in the decoded update. */
  round: number;
  /** Encoded ModelUpdate, as published. */
  payload: Uint8Array;
  /** Modification time of the entry file, in epoch milliseconds. */
  mtimeMs: number;
}

/**
 * Directory `<stateDir>/outbox/` with one `<updateId>.pb` file per pending
 * update. Files are written atomically (temp file, fsync, rename), and a
 * file that does not decode, or names another update id, is moved to
 * `outbox/corrupt/` with a warn log.
 */
export class Outbox {
  readonly dir: string;
  readonly corruptDir: string;
  private readonly log: Logger;
  /** Update ids of the entries, as of the last add, remove or list. */
  private readonly pendingIds = new Set<string>();

  constructor(stateDir: string, log: Logger) {
    if (typeof stateDir !== 'string' || stateDir.length === 0) {
      throw new TypeError('Outbox stateDir must be a non-empty string');
    }
    this.dir = path.join(stateDir, 'outbox');
    this.corruptDir = path.join(this.dir, 'corrupt');
    this.log = log;
  }

  /** Number of entries as of the last `add()`, `remove()` or `list()`. */
  get pendingCount(): number {
    return this.pendingIds.size;
  }

  /**
   * Stores `payload` as the entry of `updateId`, replacing an older one.
   * The file is complete and fsynced when the promise resolves.
   *
   * @throws {RangeError} for an update id that is not a safe file name.
   */
  async add(
    updateId: string,
    round: number,
    payload: Uint8Array,
  ): Promise<void> {
    const target = this.entryPath(updateId);
    await mkdir(this.dir, { recursive: true });
    const temp = `${target}.${randomBytes(6).toString('hex')}.tmp`;
    const handle = await open(temp, 'w');
    try {
      await handle.writeFile(payload);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temp, target);
    await this.syncDir();
    this.pendingIds.add(updateId);
    this.log.debug(
      { updateId, round, bytes: payload.length },
      'update stored in outbox',
    );
  }

  /**
   * Deletes the entry of `updateId`; returns false when there was none,
   * which includes an id that is not a valid entry name.
   */
  async remove(updateId: string): Promise<boolean> {
    if (typeof updateId !== 'string' || !UPDATE_ID_PATTERN.test(updateId)) {
      return false;
    }
    const target = this.entryPath(updateId);
    this.pendingIds.delete(updateId);
    try {
      await rm(target);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw err;
    }
    return true;
  }

  /**
   * Returns the pending entries, oldest file first. Corrupt files are
   * moved aside and left out. Temp files of an interrupted `add()` are
   * ignored.
   */
  async list(): Promise<OutboxEntry[]> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      names = [];
    }
    const entries: OutboxEntry[] = [];
    for (const name of names) {
      if (!name.endsWith(ENTRY_SUFFIX)) continue;
      const entry = await this.readEntry(name);
      if (entry !== undefined) entries.push(entry);
    }
    this.pendingIds.clear();
    for (const entry of entries) this.pendingIds.add(entry.updateId);
    return entries.sort((a, b) => a.mtimeMs - b.mtimeMs);
  }

  private async readEntry(name: string): Promise<OutboxEntry | undefined> {
    const file = path.join(this.dir, name);
    const updateId = name.slice(0, -ENTRY_SUFFIX.length);
    let payload: Uint8Array;
    let mtimeMs: number;
    try {
      payload = new Uint8Array(await readFile(file));
      mtimeMs = (await stat(file)).mtimeMs;
    } catch (err) {
      // Removed by an ack between readdir and read.
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    try {
      const update = decodeUpdatePayload(payload);
      if (update.updateId !== updateId) {
        throw new Error(
          `entry file is named for update ${updateId} but contains update ${update.updateId}`,
        );
      }
      return { updateId, round: update.round, payload, mtimeMs };
    } catch (err) {
      await this.moveAside(name, err);
      return undefined;
    }
  }

  private async moveAside(name: string, err: unknown): Promise<void> {
    const from = path.join(this.dir, name);
    const to = path.join(this.corruptDir, `${name}.${Date.now()}`);
    try {
      await mkdir(this.corruptDir, { recursive: true });
      await rename(from, to);
      this.log.warn(
        { err, file: from, movedTo: to },
        'corrupt outbox entry moved aside',
      );
    } catch (moveErr) {
      this.log.error(
        { err: moveErr, cause: err, file: from },
        'corrupt outbox entry could not be moved aside',
      );
    }
  }

  private entryPath(updateId: string): string {
    if (typeof updateId !== 'string' || !UPDATE_ID_PATTERN.test(updateId)) {
      throw new RangeError(
        `update id ${JSON.stringify(updateId)} is not usable as a file ` +
          'name; expected 1-128 letters, digits, ".", "_" or "-"',
      );
    }
    return path.join(this.dir, `${updateId}${ENTRY_SUFFIX}`);
  }

  /** Makes the rename durable; some file systems reject fsync on a directory. */
  private async syncDir(): Promise<void> {
    try {
      const handle = await open(this.dir, 'r');
      try {
        await handle.sync();
      } finally {
        await handle.close();
      }
    } catch (err) {
      this.log.debug({ err, dir: this.dir }, 'outbox directory fsync failed');
    }
  }
}
