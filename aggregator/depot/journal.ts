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
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, open, readFile, readdir, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import {
  decodeUpdatePayload,
  type Logger,
  type UpdateAck,
} from '../../protocol/index.ts';
import type { DepotRound } from './collector.ts';

const UPDATES_DIR = 'updates';
const FORWARDED_FILE = 'forwarded.json';
const OUTCOME_FILE = 'outcome.json';

/** Contents of the journal for one round. */
export interface JournalRound {
  /** Encoded updates, as received, in file name order. */
  payloads: Uint8Array[];
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

/** Reads and parses a JSON file; undefined when it does not exist. */
async function readJson(file: string): Promise<unknown> {
  try {
    return JSON.parse(await readFile(file, 'utf8'));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
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

  /** Stores an accepted update; complete on disk when it resolves. */
  async addUpdate(
    round: number,
    updateId: string,
    payload: Uint8Array,
  ): Promise<void> {
    const name = createHash('sha256').update(updateId).digest('hex');
    const file = path.join(this.#roundDir(round), UPDATES_DIR, `${name}.pb`);
    await writeAtomically(file, payload);
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

  /** Reads what the journal holds for `round`; empty when nothing. */
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
    const payloads = await Promise.all(
      names.map((name) => readFile(path.join(updatesDir, name))),
    );
    const forwarded = (await readJson(path.join(dir, FORWARDED_FILE))) as
      JournalRound['forwarded'] | undefined;
    const outcome = (await readJson(path.join(dir, OUTCOME_FILE))) as
      UpdateAck | undefined;
    return { payloads, forwarded, outcome };
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
 * Merges the journaled updates of `round` into it again, then seals and
 * settles it as far as the journal records. Returns the updates merged.
 */
export async function restoreRound(
  round: DepotRound,
  journal: DepotJournal,
  log: Logger,
): Promise<number> {
  const stored = await journal.read(round.round);
  let restored = 0;
  for (const payload of stored.payloads) {
    let vehicleId: string;
    try {
      vehicleId = decodeUpdatePayload(payload).vehicleId;
    } catch (err) {
      log.warn({ err, round: round.round }, 'journaled update unreadable');
      continue;
    }
    // Judged as of the round's opening: it was accepted in time before.
    const decision = round.judge(vehicleId, payload, round.task.openedAtMs);
    if (decision.accepted === true) restored += 1;
  }
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
