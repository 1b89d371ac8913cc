import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { startBroker, type RunningBroker } from '../broker/index.ts';
import {
  loadLabelledImages,
  resolveDataDir,
  subset,
  type LabelledImages,
} from '../models/index.ts';
import { COHORT_BUCKETS, createLogger, isInCohort } from '../protocol/index.ts';
import { VehicleAgent } from '../vehicle-agent/index.ts';
import { RolloutController } from '../scripts/rollout/controller.ts';
import {
  DEFAULT_GATES,
  type GateThresholds,
} from '../scripts/rollout/gates.ts';
import { parseStages } from '../scripts/rollout/state.ts';
import { createKeyFolder, type KeyFolder } from './signing-fixtures.ts';
import {
  readBaseWeights,
  scrambleLastLayer,
  shiftLastKernel,
  storeVersion,
  temporaryDir,
  waitUntil,
} from './rollout-fixtures.ts';

const FLEET_ID = 'rollout-fleet';
const VEHICLE_COUNT = 20;
const EVAL_FRAMES = 30;
const MIN_STAGE_MS = 60_000;
const silent = createLogger({ level: 'silent' });
const vehicleIds = Array.from(
  { length: VEHICLE_COUNT },
  (_, i) => `veh-${String(i + 1).padStart(2, '0')}`,
);

/** Gates for a test fleet: every cohort vehicle reports, stages wait. */
const gates: GateThresholds = {
  ...DEFAULT_GATES,
  minReportedFraction: 1,
  minInferences: EVAL_FRAMES,
  maxAccuracyDrop: 0.05,
  // 20 agents share 2 cores here, so latency is not what these tests gate.
  maxP50Ms: 500,
  maxP95Ms: 2000,
  minStageMs: MIN_STAGE_MS,
  stageTimeoutMs: 120_000,
};

/** Vehicles in the cohort of `percent` under `salt`, without tags. */
function cohortOf(salt: string, percent: number): string[] {
  const rule = {
    basisPoints: Math.round((percent / 100) * COHORT_BUCKETS),
    hashSalt: salt,
    vehicleIds: [],
    tags: {},
  };
  return vehicleIds.filter((id) => isInCohort(rule, id, {}));
}

/**
 * Returns the first salt "<prefix>-<n>" whose 10% cohort has 1 to 4 of the 20
 * vehicles and whose 50% cohort is strictly larger and not everyone, so
 * each stage is visible. The hash is fixed, so the choice is too.
 */
function pickSalt(prefix: string): string {
  for (let n = 0; ; n++) {
    const salt = `${prefix}-${n}`;
    const small = cohortOf(salt, 10).length;
    const half = cohortOf(salt, 50).length;
    if (small >= 1 && small <= 4 && half > small && half < VEHICLE_COUNT) {
      return salt;
    }
  }
}

describe('staged rollout over 20 vehicles', () => {
  let broker: RunningBroker;
  let keys: KeyFolder;
  let workDir: string;
  let controller: RolloutController;
  const agents: VehicleAgent[] = [];
  /** Every 'release-deployed' event, by vehicle. */
  const deployed: { vehicleId: string; version: number }[] = [];
  const baseWeights = readBaseWeights();

  function runningVersion(version: number): string[] {
    return agents
      .filter((agent) => agent.deployedVersion === version)
      .map((agent) => agent.vehicleId)
      .sort();
  }

  /** Ticks until the gates pass and only the stage time holds it back. */
  async function waitForPassingGates(): Promise<void> {
    await waitUntil(async () => {
      const evaluation = await controller.tick();
      if (controller.current?.status !== 'active') {
        throw new Error(`rollout ended early: ${evaluation?.reason}`);
      }
      return evaluation?.reason.startsWith('gates pass;') === true;
    }, 'passing gates');
  }

  before(async () => {
    workDir = temporaryDir('fleetlearn-rollout-');
    keys = createKeyFolder();
    const releaseKey = keys.createKey('release');
    const trusted = keys.writePublicKeys('trusted.json', [releaseKey]);
    broker = await startBroker({ port: 0, log: silent });
    const modelDir = path.join(workDir, 'aggregator');
    storeVersion(modelDir, 0, baseWeights);
    storeVersion(modelDir, 1, shiftLastKernel(baseWeights, 0.001));
    storeVersion(modelDir, 2, scrambleLastLayer(baseWeights, 7));

    controller = new RolloutController({
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      modelStateDir: modelDir,
      rolloutDir: path.join(workDir, 'rollout'),
      signingKey: releaseKey.signer,
      maxMessageBytes: 256 * 1024,
      log: silent,
    });
    await controller.connect();
    await controller.pin(0, 'stable version for the test fleet');

    const frames = await loadLabelledImages(resolveDataDir(), {
      split: 'train',
      limit: VEHICLE_COUNT * 40,
    });
    for (const [index, vehicleId] of vehicleIds.entries()) {
      const own: number[] = [];
      for (let i = index; i < frames.count; i += VEHICLE_COUNT) own.push(i);
      agents.push(createAgent(vehicleId, subset(frames, own), trusted));
    }
    await Promise.all(agents.map((agent) => agent.start()));
    await waitUntil(
      () => runningVersion(0).length === VEHICLE_COUNT,
      'every vehicle on version 0',
    );
  });

  function createAgent(
    vehicleId: string,
    frames: LabelledImages,
    trusted: string,
  ): VehicleAgent {
    const agent = new VehicleAgent({
      vehicleId,
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      stateDir: path.join(workDir, 'vehicles', vehicleId),
      frames,
      evalFrames: EVAL_FRAMES,
      reportIntervalMs: 0,
      trustedReleaseKeysPath: trusted,
      log: silent,
    });
    agent.on('release-deployed', (event) =>
      deployed.push({ vehicleId, version: event.version }),
    );
    return agent;
  }

  after(async () => {
    await Promise.all(agents.map((agent) => agent.stop()));
    await controller?.close();
    await broker?.close();
    keys?.remove();
    rmSync(workDir, { recursive: true, force: true });
  });

  test('good candidate goes 10, 50, 100', async () => {
    const salt = pickSalt('good');
    const stages = parseStages('10,50,100', false);

    await controller.start({
      version: 1,
      stages,
      cohortTags: {},
      vehicleIds: [],
      gates,
      hashSalt: salt,
    });
    for (const stage of stages) {
      const cohort = cohortOf(salt, stage.percent);
      await waitUntil(
        () => runningVersion(1).length === cohort.length,
        `${cohort.length} vehicles on version 1 at ${stage.percent}%`,
      );
      await waitForPassingGates();

      assert.deepEqual(runningVersion(1), cohort);
      assert.equal(runningVersion(0).length, VEHICLE_COUNT - cohort.length);
      await controller.tick(Date.now() + MIN_STAGE_MS);
    }

    assert.equal(controller.current?.status, 'promoted');
    assert.deepEqual(runningVersion(1), vehicleIds);
    const evaluation = controller.current?.lastEvaluation;
    assert.equal(evaluation?.reportedVehicles, VEHICLE_COUNT);
    assert.ok(
      evaluation!.candidate.accuracy! >= evaluation!.stable!.accuracy! - 0.05,
    );
  });

  test('degraded candidate rolled back at first stage', async () => {
    if (controller.current?.status === 'active') {
      await controller.rollback('the previous test left it active');
    }
    const salt = pickSalt('degraded');
    const cohort = cohortOf(salt, 10);
    const firstEvent = deployed.length;
    const chunksBefore = agents.map((a) => a.releaseDownloads.chunksStored);

    await controller.start({
      version: 2,
      stages: parseStages('10,50,100', false),
      cohortTags: {},
      vehicleIds: [],
      gates,
      hashSalt: salt,
    });
    await waitUntil(async () => {
      await controller.tick();
      return controller.current?.status !== 'active';
    }, 'the rollout decision');
    const state = controller.current!;
    await waitUntil(
      () => runningVersion(state.stableVersion).length === VEHICLE_COUNT,
      `every vehicle back on version ${state.stableVersion}`,
    );

    assert.equal(state.status, 'rolled-back');
    assert.equal(state.stageIndex, 0);
    assert.match(state.lastEvaluation!.reason, /accuracy/);
    const loadedDegraded = deployed
      .slice(firstEvent)
      .filter((event) => event.version === 2)
      .map((event) => event.vehicleId)
      .sort();
    assert.deepEqual(loadedDegraded, cohort);
    // Back on version 1 from the kept previous model: no chunk fetched
    // after the degraded download.
    const chunksAfter = agents.map((a) => a.releaseDownloads.chunksStored);
    for (const [index, agent] of agents.entries()) {
      const fetched = chunksAfter[index] - chunksBefore[index];
      assert.equal(fetched > 0, cohort.includes(agent.vehicleId));
    }
  });

  test('shadow stage never serves candidate', async () => {
    const salt = pickSalt('shadow');
    const cohort = cohortOf(salt, 10);
    const firstEvent = deployed.length;
    const shadowing = () =>
      agents
        .filter((agent) => agent.shadowVersion === 2)
        .map((agent) => agent.vehicleId)
        .sort();

    await controller.start({
      version: 2,
      stages: parseStages('10', true),
      cohortTags: {},
      vehicleIds: [],
      gates,
      hashSalt: salt,
    });
    const stable = controller.current!.stableVersion;
    await waitUntil(
      () => shadowing().length === cohort.length,
      'the cohort running version 2 in shadow',
    );
    const shadowedBy = shadowing();
    await waitUntil(async () => {
      await controller.tick();
      return controller.current?.status !== 'active';
    }, 'the rollout decision');
    await waitUntil(() => shadowing().length === 0, 'shadow models unloaded');

    assert.deepEqual(shadowedBy, cohort);
    assert.equal(controller.current?.status, 'rolled-back');
    assert.match(
      controller.current!.lastEvaluation!.reason,
      /shadow agreement/,
    );
    assert.deepEqual(deployed.slice(firstEvent), []);
    assert.equal(runningVersion(stable).length, VEHICLE_COUNT);
  });
});
