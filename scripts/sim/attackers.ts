/**
 * Attacker vehicles of the simulated fleet: the first N vehicles by id
 * poison what they send, so that a run measures what the aggregation
 * rule withstands. A 'label-flip' attacker trains honestly on poisoned
 * data (label 42 - label). The other kinds train honestly on true labels
 * and transform the update (see UpdateAttack in vehicle-agent/trainer.ts).
 */
import { NUM_CLASSES } from '../../models/architecture.ts';
import type { LabelledImages } from '../../models/index.ts';
import type { UpdateAttack } from '../../vehicle-agent/index.ts';

/** Attacks the simulator offers. */
export const SIM_ATTACK_KINDS = [
  'boost',
  'sign-flip',
  'noise',
  'label-flip',
] as const;

/** One of SIM_ATTACK_KINDS. */
export type SimAttackKind = (typeof SIM_ATTACK_KINDS)[number];

/** Default --attack-scale. */
export const DEFAULT_ATTACK_SCALE = 10;

/** Attack settings of a run. */
export interface AttackSettings {
  /** Number of attacker vehicles, the first ones by id. */
  attackers: number;
  attack: SimAttackKind;
  /** Factor of boost and sign-flip, noise std in update RMS units. */
  attackScale: number;
}

/**
 * Returns the ids of the attackers: the first `count` of `vehicleIds` in
 * sorted order.
 *
 * @throws {RangeError} when `count` exceeds the number of vehicles.
 */
export function selectAttackers(
  vehicleIds: readonly string[],
  count: number,
): string[] {
  if (!Number.isSafeInteger(count) || count < 0) {
    throw new RangeError(`attackers must be an integer >= 0, got ${count}`);
  }
  if (count > vehicleIds.length) {
    throw new RangeError(
      `attackers ${count} is above the ${vehicleIds.length} vehicles`,
    );
  }
  return [...vehicleIds].sort().slice(0, count);
}

/** Returns a copy of `frames` whose labels are 42 - label. */
export function flipLabels(frames: LabelledImages): LabelledImages {
  const labels = new Int32Array(frames.labels.length);
  for (let i = 0; i < labels.length; i++) {
    labels[i] = NUM_CLASSES - 1 - frames.labels[i];
  }
  return { ...frames, labels };
}

/**
 * Returns the frames and the update attack of one vehicle: its own frames
 * and no attack for an honest vehicle.
 */
export function vehicleAttack(
  settings: AttackSettings,
  isAttacker: boolean,
  frames: LabelledImages,
): { frames: LabelledImages; attack?: UpdateAttack } {
  if (!isAttacker) return { frames };
  if (settings.attack === 'label-flip') return { frames: flipLabels(frames) };
  return {
    frames,
    attack: { kind: settings.attack, scale: settings.attackScale },
  };
}
