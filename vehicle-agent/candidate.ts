/**
 * Staged rollouts on the vehicle: which release to serve, given the
 * fleet-wide notice and the candidate notice. The vehicle enforces the
 * cohort itself, from the signed rule in the candidate notice, so a
 * vehicle outside the cohort never downloads or loads the candidate even
 * though it receives the notice.
 */
import path from 'node:path';
import {
  CandidateState,
  ErrorCode,
  FleetError,
  isInCohort,
  type Logger,
  type ModelRelease,
  type PublicKeySet,
} from '../protocol/index.ts';
import { ReleaseVerifier } from './release-verifier.ts';

/**
 * Folder, below the state directory, of the candidate topic's release
 * sequence record. Candidate and fleet-wide notices come from different
 * publishers, so each topic keeps its own highest accepted sequence.
 * With one record, a candidate notice would make the older retained
 * fleet-wide notice look replayed.
 */
export const CANDIDATE_DIR = 'candidate';

/** Options of {@link CandidateTracker}. */
export interface CandidateTrackerOptions {
  vehicleId: string;
  tags: Readonly<Record<string, string>>;
  stateDir: string;
  trustedKeys: PublicKeySet | undefined;
  /** Hands the release to serve to the release handler. */
  offer: (release: ModelRelease) => void;
  /** Sets (or with undefined clears) the candidate to run in shadow. */
  setShadow: (release: ModelRelease | undefined) => void;
  log: Logger;
}

/**
 * Keeps the latest fleet-wide and candidate notices and offers the one
 * this vehicle should serve: an active candidate whose cohort includes
 * the vehicle, otherwise the fleet-wide release. When a candidate is
 * withdrawn, the fleet-wide release is offered again; the release
 * handler then switches back to the kept previous model without a
 * download.
 */
export class CandidateTracker {
  private stable: ModelRelease | undefined;
  private candidate: ModelRelease | undefined;
  private readonly verifier: ReleaseVerifier;

  constructor(private readonly options: CandidateTrackerOptions) {
    this.verifier = new ReleaseVerifier({
      stateDir: path.join(options.stateDir, CANDIDATE_DIR),
      trustedKeys: options.trustedKeys,
      log: options.log,
    });
  }

  /** Rollout id of the latest candidate notice, or ''. */
  get rolloutId(): string {
    return this.candidate?.candidate?.rolloutId ?? '';
  }

  /**
   * Checks a notice from the fleet-wide release topic. One that carries a
   * cohort is a candidate notice copied there, and is rejected.
   *
   * @throws {FleetError} MALFORMED_PAYLOAD for a notice with a cohort.
   */
  checkStable(release: ModelRelease): void {
    if (release.candidate === undefined || release.candidate === null) return;
    throw new FleetError(
      ErrorCode.MalformedPayload,
      `release notice of version ${release.version} carries the cohort of ` +
        `rollout ${release.candidate.rolloutId}; candidate notices are ` +
        'valid only on the candidate topic',
    );
  }

  /** Records the fleet-wide release and offers the release to serve. */
  onStable(release: ModelRelease): void {
    this.stable = release;
    this.offerTarget();
  }

  /**
   * Checks the signature and sequence of a candidate notice (with its
   * own sequence record) and that it carries a cohort, then offers the
   * release to serve.
   *
   * @throws {FleetError} as ReleaseVerifier.open, and MALFORMED_PAYLOAD
   *   for a notice without a cohort.
   */
  onCandidatePayload(payload: Uint8Array): void {
    const release = this.verifier.open(payload);
    if (release.candidate === undefined || release.candidate === null) {
      throw new FleetError(
        ErrorCode.MalformedPayload,
        `notice of version ${release.version} on the candidate topic has ` +
          'no cohort',
      );
    }
    this.candidate = release;
    this.options.log.info(
      {
        modelVersion: release.version,
        rolloutId: release.candidate.rolloutId,
        stage: release.candidate.stage,
        state: release.candidate.state,
        inCohort: this.isInCohort(release),
      },
      'candidate notice accepted',
    );
    this.offerTarget();
  }

  /** True when `release` is an active candidate for this vehicle. */
  private isInCohort(release: ModelRelease): boolean {
    const rollout = release.candidate;
    if (rollout === undefined || rollout === null) return false;
    return isInCohort(
      rollout.cohort,
      this.options.vehicleId,
      this.options.tags,
    );
  }

  /** The active candidate addressed to this vehicle, if any. */
  private activeCandidate(): ModelRelease | undefined {
    const release = this.candidate;
    const isActive = release?.candidate?.state === CandidateState.Active;
    if (release === undefined || !isActive) return undefined;
    if (!this.isInCohort(release)) {
      this.options.log.debug(
        { modelVersion: release.version, rolloutId: this.rolloutId },
        'candidate ignored, vehicle not in cohort',
      );
      return undefined;
    }
    return release;
  }

  private offerTarget(): void {
    const active = this.activeCandidate();
    const isShadow = active?.candidate?.shadow === true;
    this.options.setShadow(isShadow ? active : undefined);
    const target = active !== undefined && !isShadow ? active : this.stable;
    if (target !== undefined) this.options.offer(target);
  }
}
