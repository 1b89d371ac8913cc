/**
 * Fault kinds of the simulated fleet and the seeded plan that decides, per
 * round, which vehicles suffer which fault. The plan is pure: the same
 * seed, kinds, rate and sequence of rounds give the same victims, so a
 * faulty run can be repeated (timing on a shared CPU still varies).
 */
import { createRandom } from '../../models/index.ts';

/** Faults that act on one vehicle's connection or process. */
export const LINK_FAULT_KINDS = [
  'disconnect-training',
  'disconnect-upload',
  'kill-agent',
  'duplicate',
  'reorder',
  'delay-deadline',
] as const;

/** Bad payloads a misbehaving sender publishes on a vehicle's topic. */
export const PAYLOAD_FAULT_KINDS = [
  'truncated',
  'corrupt',
  'nan',
  'wrong-shape',
] as const;

/** Every fault kind, in the order reports list them. */
export const FAULT_KINDS = [
  ...LINK_FAULT_KINDS,
  ...PAYLOAD_FAULT_KINDS,
  'restart-aggregator',
] as const;

export type LinkFaultKind = (typeof LINK_FAULT_KINDS)[number];
export type PayloadFaultKind = (typeof PAYLOAD_FAULT_KINDS)[number];
export type FaultKind = (typeof FAULT_KINDS)[number];

/** Share of the selected vehicles hit by each fault kind per round. */
export const DEFAULT_FAULT_RATE = 0.25;

/** Extra time a delayed vehicle's link stays stalled after the deadline. */
const DEADLINE_MARGIN_MS = 1000;

/** One vehicle's link fault in one round, with its seeded parameters. */
export type LinkFault =
  | { kind: 'disconnect-training' }
  /** Share of the update PUBLISH bytes that reach the broker before the cut. */
  | { kind: 'disconnect-upload'; cutFraction: number }
  | {
      kind: 'kill-agent';
      moment: 'after-publish' | 'mid-training';
      /** Time between the kill and the start of the new agent. */
      pauseMs: number;
    }
  | { kind: 'duplicate'; method: 'publish-twice' | 'drop-puback' }
  /** Time the update PUBLISH is held before it goes on to the broker. */
  | { kind: 'reorder'; holdMs: number }
  /** The link stalls until the round deadline plus `marginMs`. */
  | { kind: 'delay-deadline'; marginMs: number };

/** One bad payload to publish on a vehicle's update topic. */
export interface PayloadFault {
  kind: PayloadFaultKind;
  /** Seed of the mutation (cut point, flipped bytes, NaN index). */
  seed: number;
}

/** Faults of one round. */
export interface RoundFaultPlan {
  round: number;
  /** At most one link fault per vehicle. */
  linkFaults: Map<string, LinkFault>;
  payloadFaults: Map<string, PayloadFault[]>;
}

/** Inputs of {@link FaultPlan}. */
export interface FaultPlanOptions {
  kinds: readonly FaultKind[];
  /** Share of the selected vehicles per round and kind, in (0, 1]. */
  rate: number;
  seed: number;
  /** Rounds the run requests; the restart lands inside this range. */
  rounds: number;
}

/**
 * Parses `--faults`: `all`, or a comma-separated list of fault kinds.
 *
 * @throws {RangeError} naming an unknown kind and the valid ones.
 */
export function parseFaultList(text: string): FaultKind[] {
  const names = text
    .split(',')
    .map((name) => name.trim())
    .filter((name) => name.length > 0);
  if (names.length === 1 && names[0] === 'all') return [...FAULT_KINDS];
  if (names.length === 0) {
    throw new RangeError(
      `fault list ${JSON.stringify(text)} is empty; expected "all" or ` +
        `kinds from ${FAULT_KINDS.join(', ')}`,
    );
  }
  for (const name of names) {
    if (!(FAULT_KINDS as readonly string[]).includes(name)) {
      throw new RangeError(
        `unknown fault kind ${JSON.stringify(name)}; expected "all" or ` +
          `kinds from ${FAULT_KINDS.join(', ')}`,
      );
    }
  }
  // Report order, without repeats.
  return FAULT_KINDS.filter((kind) => names.includes(kind));
}

/**
 * Seeded choice of victims. Each vehicle gets at most one link fault per
 * round. Every enabled link kind takes `victimsPerKind` vehicles, and
 * the kinds planned least often so far choose first, so with many kinds
 * and few vehicles each kind still comes up every few rounds. Payload
 * faults are chosen independently, because a misbehaving sender does not
 * touch the vehicle's own link. The aggregator restart happens once per
 * run, in `restartRound`.
 */
export class FaultPlan {
  readonly kinds: readonly FaultKind[];
  readonly rate: number;
  readonly seed: number;
  /** Round in which the aggregator restarts; undefined when not enabled. */
  readonly restartRound: number | undefined;
  readonly #linkKinds: LinkFaultKind[];
  readonly #payloadKinds: PayloadFaultKind[];
  readonly #plannedCount = new Map<LinkFaultKind, number>();
  #killCount = 0;
  #duplicateCount = 0;

  /**
   * @throws {RangeError} for a rate outside (0, 1], an empty or unknown
   *   kind list, or a round count below 1.
   */
  constructor(options: FaultPlanOptions) {
    const { kinds, rate, seed, rounds } = options;
    if (!(rate > 0 && rate <= 1)) {
      throw new RangeError(`fault rate must be in (0, 1], got ${rate}`);
    }
    if (kinds.length === 0) {
      throw new RangeError('fault plan needs at least one fault kind');
    }
    for (const kind of kinds) {
      if (!(FAULT_KINDS as readonly string[]).includes(kind)) {
        throw new RangeError(`unknown fault kind ${JSON.stringify(kind)}`);
      }
    }
    if (!Number.isSafeInteger(rounds) || rounds < 1) {
      throw new RangeError(`rounds must be an integer >= 1, got ${rounds}`);
    }
    this.kinds = [...kinds];
    this.rate = rate;
    this.seed = seed;
    this.#linkKinds = LINK_FAULT_KINDS.filter((kind) => kinds.includes(kind));
    this.#payloadKinds = PAYLOAD_FAULT_KINDS.filter((kind) =>
      kinds.includes(kind),
    );
    for (const kind of this.#linkKinds) this.#plannedCount.set(kind, 0);
    this.restartRound = kinds.includes('restart-aggregator')
      ? pickRestartRound(rounds, createRandom(mixSeed(seed, 0, 1)))
      : undefined;
  }

  /** Vehicles each kind hits in a round with `selectedCount` vehicles. */
  victimsPerKind(selectedCount: number): number {
    if (selectedCount === 0) return 0;
    return Math.max(1, Math.round(this.rate * selectedCount));
  }

  /**
   * Accepted updates after which the aggregator restarts: half the
   * selected vehicles, so the round is cut in the middle. Undefined when
   * fewer than two vehicles are selected, because one accepted update
   * would close such a round before the restart.
   */
  restartThreshold(selectedCount: number): number | undefined {
    if (selectedCount < 2) return undefined;
    return Math.floor(selectedCount / 2);
  }

  /**
   * Plans one round. Call it once per round, in round order, because the
   * kinds planned least often choose first.
   */
  planRound(round: number, selected: readonly string[]): RoundFaultPlan {
    const random = createRandom(mixSeed(this.seed, round, 2));
    const count = this.victimsPerKind(selected.length);
    const linkFaults = new Map<string, LinkFault>();
    const pool = shuffle([...selected].sort(), random);
    for (const kind of this.#linkKindsByUsage(random)) {
      const victims = pool.splice(0, count);
      for (const vehicleId of victims) {
        linkFaults.set(vehicleId, this.#linkFault(kind, random));
      }
      if (victims.length > 0) {
        this.#plannedCount.set(
          kind,
          this.#plannedCount.get(kind)! + victims.length,
        );
      }
    }

    const payloadFaults = new Map<string, PayloadFault[]>();
    for (const kind of this.#payloadKinds) {
      const victims = shuffle([...selected].sort(), random).slice(0, count);
      for (const vehicleId of victims) {
        const list = payloadFaults.get(vehicleId) ?? [];
        list.push({ kind, seed: Math.floor(random() * 2 ** 31) });
        payloadFaults.set(vehicleId, list);
      }
    }
    return { round, linkFaults, payloadFaults };
  }

  /** Link kinds, least planned first; ties in seeded order. */
  #linkKindsByUsage(random: () => number): LinkFaultKind[] {
    const shuffled = shuffle([...this.#linkKinds], random);
    return shuffled.sort(
      (a, b) => this.#plannedCount.get(a)! - this.#plannedCount.get(b)!,
    );
  }

  #linkFault(kind: LinkFaultKind, random: () => number): LinkFault {
    switch (kind) {
      case 'disconnect-training':
        return { kind };
      case 'disconnect-upload':
        return { kind, cutFraction: 0.1 + 0.8 * random() };
      case 'kill-agent':
        // Alternates, so both moments occur in a run with two kills.
        return {
          kind,
          moment:
            this.#killCount++ % 2 === 0 ? 'after-publish' : 'mid-training',
          pauseMs: Math.round(500 + 1000 * random()),
        };
      case 'duplicate':
        return {
          kind,
          method:
            this.#duplicateCount++ % 2 === 0 ? 'publish-twice' : 'drop-puback',
        };
      case 'reorder':
        return { kind, holdMs: Math.round(200 + 1800 * random()) };
      case 'delay-deadline':
        return { kind, marginMs: DEADLINE_MARGIN_MS };
    }
  }
}

/**
 * Picks a round between 2 and `rounds - 1` when there are at least three,
 * so the run has a round before and after the restart.
 */
function pickRestartRound(rounds: number, random: () => number): number {
  if (rounds < 3) return rounds;
  return 2 + Math.floor(random() * (rounds - 2));
}

/** Combines the run seed, a round and a purpose into one PRNG seed. */
function mixSeed(seed: number, round: number, purpose: number): number {
  return (
    ((seed >>> 0) * 1_000_003 + round * 7919 + purpose * 104_729) % 2 ** 32
  );
}

/** Fisher-Yates shuffle in place; returns `items`. */
function shuffle<T>(items: T[], random: () => number): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [items[i], items[j]] = [items[j], items[i]];
  }
  return items;
}
