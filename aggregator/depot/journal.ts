/**
 * On-disk journal of the depot's open round, so that a restarted depot
 * merges the updates it accepted before it died. A vehicle resends an
 * update only after it reconnects, and a depot crash does not disconnect
 * the vehicles from the depot broker, so the depot must keep the updates
 * itself until the fleet has counted them.
 *
 * Layout: `<stateDir>/rounds/<round>/updates/<sha256 of update id>.pb`
 * contains each accepted update as received, `forwarded.json` the partial id
 * and update ids once the partial is sealed, and `outcome.json` the
 * fleet's ack. Files are written to a temporary name, fsynced and renamed.
 * An update file that does not decode is renamed to `<name>.pb.bad`, so
 * that it stays for inspection and is not read again.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, open, readFile, readdir, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import {
  ErrorCode,
  FleetError,
  decodeUpdatePayload,
  type DepotUpdateEntry,
  type Logger,
  type UpdateAck,
} from '../../protocol/index.ts';
import type { DepotRound } from './collector.ts';

const UPDATES_DIR = 'updates';
const FORWARDED_FILE = 'forwarded.json';
const OUTCOME_FILE = 'outcome.json';
/** Suffix added to an update file that does not decode. */
const UNREADABLE_SUFFIX = '.bad';

/** One journaled update: its file and its bytes as received. */
export interface JournalUpdate {
  file: string;
  payload: Uint8Array;
}

/** Contents of the journal for one round. */
export interface JournalRound {
  /** Journaled updates in file name order. */
  updates: JournalUpdate[];
  /** Set once the partial was sealed. */
  forwarded?: { partialId: string; updateIds: string[] };
  /** The fleet's ack of the partial, once received. */
  outcome?: UpdateAck;
}

/** Writes `bytes` to `file` atomically: temp file, fsync, rename. */
async function writeAtomically(file: string, bytes: Uint8Array): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  const temp = `${file}.${randomBytes(6).toString('hex')}.tmp`;
  const handle = await open(temp, 'w');
  try {
    await handle.writeFile(bytes);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(temp, file);
}

/** Reads and parses a JSON file, or returns undefined when it is missing. */
async function readJson(file: string): Promise<unknown> {
  try {
    return JSON.parse(await readFile(file, 'utf8'));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

/**
 * Creates the depot's state directory when it is missing.
 *
 * @throws {FleetError} INVALID_CONFIG when it cannot be created.
 */
export async function createStateDir(stateDir: string): Promise<void> {
  try {
    await mkdir(stateDir, { recursive: true });
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `depot state directory ${stateDir} cannot be created: ` +
        (err as Error).message,
      { cause: err },
    );
  }
}

/** The journal under `<stateDir>/rounds/`. */
export class DepotJournal {
  readonly dir: string;

  constructor(stateDir: string) {
    this.dir = path.join(stateDir, 'rounds');
  }

  #roundDir(round: number): string {
    return path.join(this.dir, String(round));
  }

  #updateFile(round: number, updateId: string): string {
    const name = createHash('sha256').update(updateId).digest('hex');
    return path.join(this.#roundDir(round), UPDATES_DIR, `${name}.pb`);
  }

  /** Stores an accepted update, which is on disk once the promise resolves. */
  async addUpdate(
    round: number,
    updateId: string,
    payload: Uint8Array,
  ): Promise<void> {
    await writeAtomically(this.#updateFile(round, updateId), payload);
  }

  /** Deletes a journaled update, or does nothing when it is missing. */
  async removeUpdate(round: number, updateId: string): Promise<void> {
    await rm(this.#updateFile(round, updateId), { force: true });
  }

  /**
   * Renames an update file that does not decode to `<file>.bad`, so that
   * later reads skip it. Returns the new path.
   */
  async setAside(file: string): Promise<string> {
    const target = `${file}${UNREADABLE_SUFFIX}`;
    await rename(file, target);
    return target;
  }

  /** Records the sealed partial of `round`, before it is first sent. */
  async recordForwarded(
    round: number,
    forwarded: { partialId: string; updateIds: string[] },
  ): Promise<void> {
    const file = path.join(this.#roundDir(round), FORWARDED_FILE);
    await writeAtomically(file, Buffer.from(JSON.stringify(forwarded)));
  }

  /** Records the fleet's ack of the partial of `round`. */
  async recordOutcome(round: number, outcome: UpdateAck): Promise<void> {
    const file = path.join(this.#roundDir(round), OUTCOME_FILE);
    await writeAtomically(file, Buffer.from(JSON.stringify(outcome)));
  }

  /** Reads the journal of `round`, which is empty when nothing was stored. */
  async read(round: number): Promise<JournalRound> {
    const dir = this.#roundDir(round);
    const updatesDir = path.join(dir, UPDATES_DIR);
    let names: string[] = [];
    try {
      names = (await readdir(updatesDir)).filter((n) => n.endsWith('.pb'));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    names.sort();
    const updates = await Promise.all(
      names.map(async (name) => {
        const file = path.join(updatesDir, name);
        return { file, payload: await readFile(file) };
      }),
    );
    const forwarded = (await readJson(path.join(dir, FORWARDED_FILE))) as
      JournalRound['forwarded'] | undefined;
    const outcome = (await readJson(path.join(dir, OUTCOME_FILE))) as
      UpdateAck | undefined;
    return { updates, forwarded, outcome };
  }

  /** Returns the rounds the journal contains, in ascending order. */
  async rounds(): Promise<number[]> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    return names
      .filter((name) => /^\d+$/.test(name))
      .map(Number)
      .filter(Number.isSafeInteger)
      .sort((a, b) => a - b);
  }

  /**
   * Removes every round but `keepRound`. Called when a new round task
   * arrives, because the fleet then no longer takes the older rounds.
   */
  async removeOtherRounds(keepRound: number): Promise<number[]> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    const removed = names.filter((name) => name !== String(keepRound));
    for (const name of removed) {
      await rm(path.join(this.dir, name), { recursive: true, force: true });
    }
    return removed.map(Number).filter(Number.isSafeInteger);
  }
}

/**
 * Decodes the vehicle id of each journaled update. An update that does
 * not decode is renamed aside and logged with its file, so that it is not
 * read again at every start.
 */
async function readableUpdates(
  round: number,
  updates: readonly JournalUpdate[],
  journal: DepotJournal,
  log: Logger,
): Promise<Array<{ payload: Uint8Array; entry: DepotUpdateEntry }>> {
  const readable = [];
  for (const { file, payload } of updates) {
    try {
      const { vehicleId, updateId, numExamples } = decodeUpdatePayload(payload);
      readable.push({ payload, entry: { vehicleId, updateId, numExamples } });
    } catch (err) {
      let movedTo: string | undefined;
      try {
        movedTo = await journal.setAside(file);
      } catch (renameErr) {
        log.error(
          { err: renameErr, round, file },
          'renaming the unreadable update failed, it is read again later',
        );
      }
      log.error({ err, round, file, movedTo }, 'journaled update unreadable');
    }
  }
  return readable;
}

/**
 * Merges the journaled updates of `round` into it again, then seals and
 * settles it as far as the journal records. Returns the updates merged.
 */
export async function restoreRound(
  round: DepotRound,
  journal: DepotJournal,
  log: Logger,
): Promise<number> {
  const stored = await journal.read(round.round);
  const restored = await mergeUpdates(round, stored.updates, journal, log);

  if (stored.forwarded !== undefined && restored > 0) {
    const sealed = round.seal(Date.now());
    if (sealed.partialId !== stored.forwarded.partialId) {
      log.warn(
        { round: round.round, partialId: sealed.partialId },
        'journal does not hold every update of the forwarded partial',
      );
    }
    if (stored.outcome !== undefined) round.settle(stored.outcome);
  }
  return restored;
}

/**
 * Merges the journaled updates of `round` whose update id is in `keep`
 * into it, for a partial without the entries the fleet had counted
 * already. Returns the updates merged.
 */
export async function mergeJournaled(
  round: DepotRound,
  keep: ReadonlySet<string>,
  journal: DepotJournal,
  log: Logger,
): Promise<number> {
  const stored = await journal.read(round.round);
  return mergeUpdates(round, stored.updates, journal, log, keep);
}

async function mergeUpdates(
  round: DepotRound,
  updates: readonly JournalUpdate[],
  journal: DepotJournal,
  log: Logger,
  keep?: ReadonlySet<string>,
): Promise<number> {
  const readable = await readableUpdates(round.round, updates, journal, log);
  let merged = 0;
  for (const { payload, entry } of readable) {
    if (keep !== undefined && !keep.has(entry.updateId)) continue;
    // Judged as of the round's opening, because it was accepted in time before.
    const decision = round.judge(
      entry.vehicleId,
      payload,
      round.task.openedAtMs,
    );
    if (decision.accepted === true) merged += 1;
  }
  return merged;
}

/** A forwarded partial of the journal that the fleet has not acked yet. */
export interface UnsettledPartial {
  round: number;
  partialId: string;
  /** The merged updates the partial covers. */
  entries: DepotUpdateEntry[];
}

/**
 * Reads every round of the journal whose partial was sent but whose
 * fleet ack is not recorded. The depot reads them before it subscribes
 * to its ack topic, so that an ack queued in its session while it was
 * down still finds its vehicles.
 */
export async function readUnsettled(
  journal: DepotJournal,
  log: Logger,
): Promise<UnsettledPartial[]> {
  const unsettled: UnsettledPartial[] = [];
  for (const round of await journal.rounds()) {
    const stored = await journal.read(round);
    if (stored.forwarded === undefined || stored.outcome !== undefined) {
      continue;
    }
    const covered = new Set(stored.forwarded.updateIds);
    const readable = await readableUpdates(round, stored.updates, journal, log);
    const entries = readable
      .map(({ entry }) => entry)
      .filter((entry) => covered.has(entry.updateId));
    if (entries.length === 0) continue;
    unsettled.push({ round, partialId: stored.forwarded.partialId, entries });
  }
  return unsettled;
}
