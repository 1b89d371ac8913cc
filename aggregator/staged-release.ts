/**
 * Staged releases (option stagedReleases): the aggregator stores each new
 * version but leaves `releases/current` to the rollout controller. It
 * marks the version held, opens no round until the fleet-wide notice
 * names a stored version, and then trains from that version.
 */
import { createHash, createPublicKey } from 'node:crypto';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import {
  CandidateState,
  decodeModelRelease,
  decodeSignedRelease,
  verifyEnvelope,
  type FleetTopics,
  type Logger,
  type ModelRelease,
  type PublicKeySet,
  type SigningKey,
} from '../protocol/index.ts';
import type { ModelStore, StoredModel } from './model-store.ts';
import type { RunnerSwitch } from './round-loop.ts';
import { rollbackSteps, type RollbackHost } from './rollback.ts';
import { writeFileAtomic } from './state.ts';

/** File in the state directory naming the held version. */
export const HOLD_FILE = 'staged-release.json';

/**
 * Time `start()` waits for the retained fleet-wide notice. The broker
 * sends retained messages right after the subscription, so this is paid
 * in full only when the fleet has no release yet.
 */
export const STARTUP_NOTICE_WAIT_MS = 2000;

/** A version stored but not yet released to the whole fleet. */
interface Hold {
  version: number;
  /** SHA-256 of the fleet-wide notice when the version was held. */
  fleetDigest: string | undefined;
}

/** The latest notice on `releases/current`. */
interface FleetNotice {
  version: number;
  /** SHA-256 of the payload, which distinguishes two publications. */
  digest: string;
}

/** Options of {@link StagedRelease}. */
export interface StagedReleaseOptions {
  topics: FleetTopics;
  stateDir: string;
  store: ModelStore;
  log: Logger;
  /** With it, only notices signed with this key count. */
  signingKey: SigningKey | undefined;
}

/** Callbacks of the aggregator that the gate uses to adopt a version. */
export interface AdoptionHost {
  rollback: RollbackHost;
  /** The round loop's `switchRunner`. */
  switchRunner(steps: RunnerSwitch): Promise<void>;
}

/**
 * Follows the fleet-wide release and decides which version the next
 * round trains from.
 */
export class StagedRelease {
  readonly #options: StagedReleaseOptions;
  readonly #holdPath: string;
  readonly #trustedKeys: PublicKeySet | undefined;
  readonly #listeners = new Set<() => void>();
  #fleet: FleetNotice | undefined;
  #hold: Hold | undefined;
  /** True once the fleet decided on the held version. */
  #isDecided = false;
  /** Notice whose version an adoption was tried for, not to retry it. */
  #triedDigest: string | undefined;

  constructor(options: StagedReleaseOptions) {
    this.#options = options;
    this.#holdPath = join(options.stateDir, HOLD_FILE);
    this.#hold = this.#readHold();
    const key = options.signingKey;
    this.#trustedKeys =
      key === undefined
        ? undefined
        : new Map([
            [
              key.keyId,
              {
                keyId: key.keyId,
                publicKey: createPublicKey(key.publicKeyPem),
              },
            ],
          ]);
  }

  /** Topics to subscribe to: the fleet-wide and the candidate notice. */
  get subscriptions(): string[] {
    const { topics } = this.#options;
    return [topics.release(), topics.candidateRelease()];
  }

  /** Version of the latest fleet-wide notice; undefined before one. */
  get fleetVersion(): number | undefined {
    return this.#fleet?.version;
  }

  /**
   * Takes a message from a release topic; returns false for any other
   * topic. `isRetained` is the packet's retain flag, set by the broker
   * only when it replays a stored notice to a new subscription.
   */
  receive(topic: string, payload: Buffer, isRetained: boolean): boolean {
    const { topics, log } = this.#options;
    const isFleetWide = topic === topics.release();
    if (!isFleetWide && topic !== topics.candidateRelease()) return false;
    if (payload.length === 0) return true;
    let release: ModelRelease;
    try {
      release = this.#open(payload);
    } catch (err) {
      log.warn({ err, topic, bytes: payload.length }, 'release notice ignored');
      return true;
    }
    if (isFleetWide) this.#onFleetNotice(release, payload, isRetained);
    else this.#onCandidateNotice(release);
    for (const listener of [...this.#listeners]) listener();
    return true;
  }

  /**
   * Records that `version` is stored but not released, in memory and in
   * the state directory, so that a restart keeps waiting for the fleet.
   */
  hold(version: number): void {
    this.#hold = { version, fleetDigest: this.#fleet?.digest };
    this.#isDecided = false;
    writeFileAtomic(this.#holdPath, `${JSON.stringify(this.#hold, null, 2)}\n`);
    this.#options.log.info(
      { modelVersion: version, fleetVersion: this.#fleet?.version },
      'version held for staged rollout',
    );
  }

  /**
   * At start: waits up to STARTUP_NOTICE_WAIT_MS for the retained
   * fleet-wide notice. Returns true when the aggregator should publish
   * `version` itself: the fleet has no release, and `version` is not held.
   */
  async shouldPublishAtStart(
    version: number,
    signal: AbortSignal,
  ): Promise<boolean> {
    const timeout = AbortSignal.timeout(STARTUP_NOTICE_WAIT_MS);
    const waiting = AbortSignal.any([signal, timeout]);
    while (this.#fleet === undefined && !waiting.aborted) {
      await this.#nextNotice(waiting);
    }
    if (this.#fleet !== undefined) return false;
    const isHeld = this.#hold?.version === version;
    this.#options.log.info(
      { modelVersion: version, isHeld },
      isHeld
        ? 'no fleet-wide release, held version not published'
        : 'no fleet-wide release, publishing the current version',
    );
    return !isHeld;
  }

  /**
   * Resolves true when the next round may train from `model`: the
   * fleet-wide release names it. When the fleet decided on another
   * stored version, starts the switch to it and resolves false, as it
   * does on abort. Waits without a time limit, logging once.
   */
  async gate(
    model: StoredModel,
    signal: AbortSignal,
    host: AdoptionHost,
  ): Promise<boolean> {
    const current = model.manifest.version;
    let hasLogged = false;
    while (!signal.aborted) {
      const version = this.#decide(current);
      if (version === current) {
        this.#clearHold();
        return true;
      }
      if (version !== undefined) {
        this.#adopt(version, current, host);
        return false;
      }
      if (!hasLogged) {
        hasLogged = true;
        this.#options.log.info(
          {
            modelVersion: current,
            fleetVersion: this.#fleet?.version,
            isHeld: this.#hold?.version === current,
          },
          'waiting for the fleet-wide release',
        );
      }
      await this.#nextNotice(signal);
    }
    return false;
  }

  /**
   * The version to train from, or undefined to wait. A held version
   * waits until the fleet names it, or until a notice that arrived after
   * the hold (or a withdrawal of its candidate) names another one.
   */
  #decide(current: number): number | undefined {
    const fleet = this.#fleet;
    if (fleet === undefined) return undefined;
    if (fleet.version === current) return current;
    if (this.#hold?.version === current && !this.#isDecided) return undefined;
    if (fleet.digest === this.#triedDigest) return undefined;
    if (!this.#options.store.has(fleet.version)) {
      this.#triedDigest = fleet.digest;
      this.#options.log.warn(
        { modelVersion: current, fleetVersion: fleet.version },
        'fleet-wide release names a version that is not stored',
      );
      return undefined;
    }
    return fleet.version;
  }

  /** Switches the round loop to stored `version`, without publishing. */
  #adopt(version: number, current: number, host: AdoptionHost): void {
    const { log } = this.#options;
    this.#triedDigest = this.#fleet?.digest;
    this.#clearHold();
    log.info(
      { modelVersion: version, previousVersion: current },
      'fleet-wide release adopted',
    );
    // The rollout controller published the notice; publishing it again
    // would only raise the release sequence.
    const rollback = { ...host.rollback, publishRelease: async () => {} };
    host
      .switchRunner(rollbackSteps(rollback, version, true))
      .catch((err: unknown) => {
        log.error(
          { err, modelVersion: version },
          'fleet-wide release not adopted',
        );
      });
  }

  #onFleetNotice(
    release: ModelRelease,
    payload: Buffer,
    isRetained: boolean,
  ): void {
    const digest = createHash('sha256').update(payload).digest('hex');
    this.#fleet = { version: release.version, digest };
    const hold = this.#hold;
    // A retained copy of the notice seen at the hold comes with every
    // resubscription, so it is no decision. An unsigned pin of the same
    // version has the same bytes, but it arrives live.
    if (hold !== undefined && (!isRetained || digest !== hold.fleetDigest)) {
      this.#isDecided = true;
    }
  }

  #onCandidateNotice(release: ModelRelease): void {
    const hold = this.#hold;
    if (hold === undefined || release.version !== hold.version) return;
    if (release.candidate?.state === CandidateState.Withdrawn) {
      this.#isDecided = true;
    }
  }

  /** Decodes a notice, checking its signature when a key is set. */
  #open(payload: Buffer): ModelRelease {
    const envelope = decodeSignedRelease(payload);
    const trustedKeys = this.#trustedKeys;
    if (envelope === undefined) {
      if (trustedKeys !== undefined) {
        throw new Error(
          'release notice is not signed, and this aggregator signs its ' +
            'releases, so it expects a signed one',
        );
      }
      return decodeModelRelease(payload);
    }
    if (trustedKeys !== undefined) {
      verifyEnvelope('release', envelope, trustedKeys);
    }
    return decodeModelRelease(envelope.signedBytes);
  }

  /** Resolves on the next notice, or when `signal` aborts. */
  #nextNotice(signal: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        this.#listeners.delete(done);
        signal.removeEventListener('abort', done);
        resolve();
      };
      this.#listeners.add(done);
      signal.addEventListener('abort', done, { once: true });
      if (signal.aborted) done();
    });
  }

  #clearHold(): void {
    if (this.#hold === undefined) return;
    this.#hold = undefined;
    this.#isDecided = false;
    rmSync(this.#holdPath, { force: true });
  }

  #readHold(): Hold | undefined {
    if (!existsSync(this.#holdPath)) return undefined;
    try {
      const parsed = JSON.parse(readFileSync(this.#holdPath, 'utf8')) as Hold;
      if (!Number.isSafeInteger(parsed.version)) {
        throw new Error(`version is ${String(parsed.version)}, not an integer`);
      }
      return parsed;
    } catch (err) {
      // Without the record, the next notice decides which version to use.
      this.#options.log.error(
        { err, path: this.#holdPath },
        'held version record unreadable, following the fleet-wide release',
      );
      return undefined;
    }
  }
}
