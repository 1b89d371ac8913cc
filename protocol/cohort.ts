/**
 * Cohorts of a staged rollout: which vehicles may deploy a candidate.
 * Vehicles and the rollout controller share this code, so both sides
 * compute the same membership from the same signed rule.
 */
import { createHash } from 'node:crypto';
import type { CohortRule } from './messages.ts';

/** Number of hash buckets; a cohort share is given in these units. */
export const COHORT_BUCKETS = 10_000;

/**
 * Bucket of a vehicle id under `hashSalt`: the first 4 bytes of
 * SHA-256("<salt>:<id>") as a big-endian integer, modulo 10,000. Stable
 * across processes and restarts, and spread evenly over vehicle ids.
 */
export function cohortBucketOf(hashSalt: string, vehicleId: string): number {
  const digest = createHash('sha256')
    .update(`${hashSalt}:${vehicleId}`, 'utf8')
    .digest();
  return digest.readUInt32BE(0) % COHORT_BUCKETS;
}

/**
 * True when the vehicle belongs to the cohort: it has every tag of the
 * rule, and its id is listed or its bucket is below the rule's share.
 */
export function isInCohort(
  rule: CohortRule,
  vehicleId: string,
  vehicleTags: Readonly<Record<string, string>>,
): boolean {
  for (const [key, value] of Object.entries(rule.tags)) {
    if (vehicleTags[key] !== value) return false;
  }
  if (rule.vehicleIds.includes(vehicleId)) return true;
  return cohortBucketOf(rule.hashSalt, vehicleId) < rule.basisPoints;
}

/**
 * Checks a cohort rule built from user input.
 *
 * @throws {RangeError} for a share outside 0-10,000 basis points, an
 *   empty salt with a share above 0, or an empty id or tag.
 */
export function checkCohortRule(rule: CohortRule): CohortRule {
  const { basisPoints } = rule;
  if (
    !Number.isSafeInteger(basisPoints) ||
    basisPoints < 0 ||
    basisPoints > COHORT_BUCKETS
  ) {
    throw new RangeError(
      `cohort share is ${basisPoints} basis points, expected an integer ` +
        `from 0 to ${COHORT_BUCKETS}`,
    );
  }
  if (basisPoints > 0 && rule.hashSalt.length === 0) {
    throw new RangeError('a cohort share above 0 needs a non-empty hash salt');
  }
  if (rule.vehicleIds.some((id) => id.length === 0)) {
    throw new RangeError('cohort vehicle ids must not be empty strings');
  }
  for (const [key, value] of Object.entries(rule.tags)) {
    if (key.length === 0 || value.length === 0) {
      throw new RangeError(
        `cohort tag ${JSON.stringify(key)}=${JSON.stringify(value)} has an ` +
          'empty key or value',
      );
    }
  }
  return rule;
}

/**
 * Parses tags given as `key=value` strings, for example
 * `["region=eu", "type=van"]`.
 *
 * @throws {RangeError} for an entry without "=", with an empty key or
 *   value, or a key given twice.
 */
export function parseTags(entries: readonly string[]): Record<string, string> {
  const tags: Record<string, string> = {};
  for (const entry of entries) {
    const at = entry.indexOf('=');
    const key = at < 0 ? '' : entry.slice(0, at).trim();
    const value = at < 0 ? '' : entry.slice(at + 1).trim();
    if (key.length === 0 || value.length === 0) {
      throw new RangeError(
        `tag ${JSON.stringify(entry)} is not key=value, for example region=eu`,
      );
    }
    if (Object.hasOwn(tags, key)) {
      throw new RangeError(`tag ${key} is given twice`);
    }
    tags[key] = value;
  }
  return tags;
}
