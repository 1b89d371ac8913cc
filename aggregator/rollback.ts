/**
 * Rollback of the aggregator to an older stored model version: checks,
 * the state it saves, and the steps that replace the round runner.
 */
import { ErrorCode, FleetError, type Logger } from '../protocol/index.ts';
import type { RoundFailedEvent } from './events.ts';
import { checkWeights } from './model-check.ts';
import type { ModelStore, StoredModel } from './model-store.ts';
import type { OpenRound } from './round.ts';
import type { RunnerSwitch } from './round-loop.ts';
import { saveState, type AggregatorState } from './state.ts';

/**
 * Loads the target of a rollback from the store, after checking that it
 * is stored and older than the current version.
 *
 * `allowNewer` also accepts a newer stored version, for a staged release
 * that adopts whatever version the fleet runs.
 *
 * @throws {RangeError} when `target` is not an integer >= 0.
 * @throws {FleetError} INVALID_MODEL when the target is not stored or its
 *   files are damaged, INVALID_CONFIG when it is not older than `current`
 *   (or, with `allowNewer`, when it is `current`).
 */
export function loadRollbackTarget(
  store: ModelStore,
  target: number,
  current: number,
  allowNewer = false,
): StoredModel {
  if (!Number.isSafeInteger(target) || target < 0) {
    throw new RangeError(
      `rollback target ${target} is not a model version; expected an ` +
        'integer >= 0',
    );
  }
  if (allowNewer ? target === current : target >= current) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `cannot roll back to model version ${target}: the current version ` +
        `is ${current}, and a rollback target must be older`,
    );
  }
  if (!store.has(target)) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `cannot roll back to model version ${target} from ${current}: ` +
        `${store.pathOf(target, 'json')} does not exist (stored versions: ` +
        `${store.versions().join(', ')})`,
    );
  }
  const model = store.load(target);
  checkWeights(model.weights, store.pathOf(target, 'weights.pb'));
  return model;
}

/**
 * Picks the model the aggregator serves at start: the current one, or the
 * rollback target, in which case state.json is updated and the rollback
 * logged.
 *
 * @throws the errors of {@link loadRollbackTarget}.
 */
export function selectStartModel(
  store: ModelStore,
  stateDir: string,
  loaded: { state: AggregatorState; model: StoredModel },
  rollbackToVersion: number | undefined,
  log: Logger,
): StoredModel {
  const { state, model } = loaded;
  if (rollbackToVersion === undefined) return model;
  const current = model.manifest.version;
  const target = loadRollbackTarget(store, rollbackToVersion, current);
  saveState(stateDir, { round: state.round, modelVersion: rollbackToVersion });
  log.warn(
    { modelVersion: rollbackToVersion, previousVersion: current },
    'model rolled back',
  );
  return target;
}

/** Callbacks and state of the aggregator that the rollback steps use. */
export interface RollbackHost {
  store: ModelStore;
  stateDir: string;
  log: Logger;
  /** Emits 'round-failed' for the abandoned round. */
  reportFailedRound(event: RoundFailedEvent): void;
  /** Publishes the retained round task; empty bytes clear it. */
  publishRoundTask(bytes: Uint8Array, round: number): void;
  /** Publishes the chunks and retained notice of `model`. */
  publishRelease(model: StoredModel): Promise<void>;
}

/**
 * Steps that replace the round runner with one that starts from stored
 * model `target`: check, save state, report the abandoned round with
 * ROLLED_BACK, clear the retained round task and publish the release.
 * `allowNewer` is that of {@link loadRollbackTarget}.
 */
export function rollbackSteps(
  host: RollbackHost,
  target: number,
  allowNewer = false,
): RunnerSwitch {
  return {
    check: (current) => {
      const version = current.model.manifest.version;
      loadRollbackTarget(host.store, target, version, allowNewer);
    },
    prepare: (stopped) => {
      // The runner built from the returned model resets the server
      // optimizer's moments, which came from the withdrawn versions (see
      // server-step.ts). A round that was closing may have produced a
      // newer version.
      const model = loadRollbackTarget(
        host.store,
        target,
        stopped.model.manifest.version,
        allowNewer,
      );
      saveState(host.stateDir, {
        round: stopped.lastRound,
        modelVersion: target,
      });
      return model;
    },
    finish: async (stopped, model, abandoned) => {
      const withdrawn = stopped.model.manifest.version;
      host.log.warn(
        {
          modelVersion: target,
          previousVersion: withdrawn,
          round: stopped.lastRound,
        },
        'model rolled back',
      );
      if (abandoned !== undefined) {
        host.reportFailedRound(rolledBackRound(abandoned, withdrawn, target));
        const { round, accepted, rejected } = abandoned.stats();
        host.log.warn(
          {
            round,
            modelVersion: target,
            code: ErrorCode.RolledBack,
            accepted,
            rejected,
          },
          'round failed',
        );
      }
      // Clears the retained task of the abandoned round for late joiners.
      host.publishRoundTask(new Uint8Array(0), stopped.lastRound);
      await host.publishRelease(model);
    },
  };
}

function rolledBackRound(
  round: OpenRound,
  withdrawn: number,
  target: number,
): RoundFailedEvent {
  const stats = round.stats();
  return {
    ...stats,
    modelVersion: target,
    reasonCode: ErrorCode.RolledBack,
    message:
      `round ${stats.round} abandoned: the fleet rolled back from model ` +
      `version ${withdrawn} to ${target}`,
  };
}
