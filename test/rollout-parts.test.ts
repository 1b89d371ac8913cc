import assert from 'node:assert/strict';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, describe, test } from 'node:test';

import { startBroker } from '../broker/index.ts';
import {
  CandidateState,
  ErrorCode,
  FleetError,
  FleetTopics,
  VersionRole,
  checkCohortRule,
  cohortBucketOf,
  createLogger,
  decodeModelRelease,
  decodeSignedRelease,
  decodeVehicleReport,
  encodeModelRelease,
  encodeVehicleReport,
  isInCohort,
  parseTags,
  type VehicleReport,
  type VersionReport,
} from '../protocol/index.ts';
import { RolloutController } from '../scripts/rollout/controller.ts';
import { parseList } from '../scripts/rollout/cli-options.ts';
import {
  DEFAULT_GATES,
  checkGates,
  evaluateGates,
  type GateInput,
} from '../scripts/rollout/gates.ts';
import {
  parseStages,
  readState,
  statePathOf,
} from '../scripts/rollout/state.ts';
import { CandidateTracker } from '../vehicle-agent/candidate.ts';
import { holdOutFrames } from '../vehicle-agent/evaluation.ts';
import { percentile } from '../vehicle-agent/reports.ts';
import { buildChunkedRelease } from './release-fixtures.ts';
import {
  readBaseWeights,
  shiftLastKernel,
  storeVersion,
  temporaryDir,
  waitUntil,
} from './rollout-fixtures.ts';
import { connectClient } from './release-fixtures.ts';
import { endClient } from '../protocol/mqtt-end.ts';

const silent = createLogger({ level: 'silent' });
const ids = Array.from({ length: 1000 }, (_, i) => `veh-${i}`);
const dirs: string[] = [];
after(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function rule(basisPoints: number, extra: object = {}) {
  return { basisPoints, hashSalt: 'salt', vehicleIds: [], tags: {}, ...extra };
}

const isFleetCode = (code: string) => (err: unknown) =>
  err instanceof FleetError && err.code === code;

describe('cohort rule', () => {
  test('bucket is stable and in range', () => {
    const buckets = ids.map((id) => cohortBucketOf('salt', id));

    assert.deepEqual(
      ids.map((id) => cohortBucketOf('salt', id)),
      buckets,
    );
    assert.ok(buckets.every((b) => Number.isInteger(b) && b >= 0 && b < 1e4));
    assert.notDeepEqual(
      ids.map((id) => cohortBucketOf('other', id)),
      buckets,
    );
  });

  test('wider share keeps earlier members', () => {
    const small = ids.filter((id) => isInCohort(rule(1000), id, {}));
    const large = ids.filter((id) => isInCohort(rule(5000), id, {}));

    assert.ok(small.every((id) => large.includes(id)));
    assert.ok(small.length > 60, `${small.length} of 1000 at 10%`);
    assert.ok(small.length < 140, `${small.length} of 1000 at 10%`);
    assert.ok(large.length > 440, `${large.length} of 1000 at 50%`);
    assert.ok(large.length < 560, `${large.length} of 1000 at 50%`);
  });

  test('tags and listed ids', () => {
    const tagged = rule(10_000, { tags: { region: 'eu' } });
    const listed = rule(0, { vehicleIds: ['veh-7'] });

    assert.equal(isInCohort(tagged, 'veh-1', { region: 'eu' }), true);
    assert.equal(isInCohort(tagged, 'veh-1', { region: 'us' }), false);
    assert.equal(isInCohort(tagged, 'veh-1', {}), false);
    assert.equal(isInCohort(listed, 'veh-7', {}), true);
    assert.equal(isInCohort(listed, 'veh-8', {}), false);
  });

  test('bad rules and tags rejected', () => {
    assert.throws(() => checkCohortRule(rule(10_001)), RangeError);
    assert.throws(() => checkCohortRule(rule(0.5)), RangeError);
    assert.throws(
      () => checkCohortRule(rule(100, { hashSalt: '' })),
      RangeError,
    );
    assert.throws(
      () => checkCohortRule(rule(0, { vehicleIds: [''] })),
      RangeError,
    );
    assert.throws(() => parseTags(['region']), /not key=value/);
    assert.throws(() => parseTags(['=eu']), RangeError);
    assert.throws(() => parseTags(['a=1', 'a=2']), /given twice/);
    assert.deepEqual(parseTags(['region=eu', 'type=van']), {
      region: 'eu',
      type: 'van',
    });
  });
});

const CANDIDATE = { version: 2, sha256: 'b'.repeat(64) };
const STABLE = { version: 1, sha256: 'a'.repeat(64) };

function entry(
  model: { version: number; sha256: string },
  role: number,
  fields: Partial<VersionReport> = {},
): VersionReport {
  return {
    ...model,
    role,
    inferenceCount: 50,
    errorCount: 0,
    latencyP50Ms: 0.5,
    latencyP95Ms: 1,
    meanConfidence: 0.9,
    labelledCount: 40,
    correctCount: 30,
    comparedCount: 0,
    agreedCount: 0,
    ...fields,
  };
}

function report(vehicleId: string, versions: VersionReport[]): VehicleReport {
  return {
    vehicleId,
    createdAtMs: 2000,
    modelName: 'm',
    tags: {},
    versions,
    rolloutId: '',
  };
}

function input(reports: VehicleReport[], nowMs = 3000): GateInput {
  return {
    reports,
    candidate: CANDIDATE,
    stable: STABLE,
    cohort: rule(10_000),
    shadow: false,
    stageStartedAtMs: 1000,
    nowMs,
    gates: {
      ...DEFAULT_GATES,
      minVehicles: 2,
      minStageMs: 5000,
      stageTimeoutMs: 60_000,
    },
  };
}

describe('rollout gates', () => {
  const good = (id: string, fields: Partial<VersionReport> = {}) =>
    report(id, [
      entry(CANDIDATE, VersionRole.Serving, fields),
      entry(STABLE, VersionRole.Previous),
    ]);

  test('too few reports wait', () => {
    const evaluation = evaluateGates(input([good('a')]));

    assert.equal(evaluation.decision, 'wait');
    assert.match(evaluation.reason, /1 of 2 required/);
  });

  test('too few reports time out', () => {
    const evaluation = evaluateGates(input([good('a')], 61_001));

    assert.equal(evaluation.decision, 'rollback');
    assert.match(evaluation.reason, /timed out/);
  });

  test('gates pass then promote', () => {
    const early = evaluateGates(input([good('a'), good('b')]));
    const late = evaluateGates(input([good('a'), good('b')], 6000));

    assert.equal(early.decision, 'wait');
    assert.match(early.reason, /^gates pass;/);
    assert.equal(late.decision, 'promote');
    assert.equal(late.candidate.accuracy, 0.75);
    assert.equal(late.stable?.accuracy, 0.75);
  });

  test('accuracy drop rolls back', () => {
    const evaluation = evaluateGates(
      input([good('a', { correctCount: 1 }), good('b', { correctCount: 1 })]),
    );

    assert.equal(evaluation.decision, 'rollback');
    assert.match(evaluation.reason, /accuracy 0.025 more than 0.02 below/);
  });

  test('latency, errors and confidence roll back', () => {
    const slow = evaluateGates(
      input([good('a', { latencyP95Ms: 80 }), good('b')]),
    );
    const failing = evaluateGates(
      input([good('a', { errorCount: 5 }), good('b')]),
    );
    const unsure = evaluateGates(
      input([good('a', { meanConfidence: 0.2 }), good('b')]),
    );

    assert.match(slow.reason, /p95 latency 80.000 ms above 50 ms/);
    assert.match(failing.reason, /error rate/);
    assert.match(unsure.reason, /mean confidence/);
  });

  test('stale and thin reports do not count', () => {
    const stale = { ...good('a'), createdAtMs: 500 };
    const thin = good('b', { inferenceCount: 3 });

    const evaluation = evaluateGates(input([stale, thin]));

    assert.equal(evaluation.reportedVehicles, 0);
    assert.equal(evaluation.cohortVehicles, 2);
  });

  test('shadow agreement gate', () => {
    const shadowed = (id: string, agreed: number) =>
      report(id, [
        entry(STABLE, VersionRole.Serving),
        entry(CANDIDATE, VersionRole.Shadow, {
          comparedCount: 40,
          agreedCount: agreed,
        }),
      ]);
    const low = evaluateGates({
      ...input([shadowed('a', 20), shadowed('b', 20)]),
      shadow: true,
    });
    const high = evaluateGates({
      ...input([shadowed('a', 40), shadowed('b', 39)], 6000),
      shadow: true,
    });

    assert.match(low.reason, /shadow agreement 0.500 below 0.9/);
    assert.equal(high.decision, 'promote');
  });

  test('bad thresholds rejected', () => {
    assert.throws(
      () => checkGates({ ...DEFAULT_GATES, maxErrorRate: 1.5 }),
      /maxErrorRate is 1.5/,
    );
    assert.throws(
      () => checkGates({ ...DEFAULT_GATES, maxP95Ms: -1 }),
      RangeError,
    );
    assert.throws(
      () => checkGates({ ...DEFAULT_GATES, minStageMs: Number.NaN }),
      RangeError,
    );
  });
});

describe('rollout state and inputs', () => {
  test('stages parse and reject', () => {
    assert.deepEqual(parseStages('10, 50,100', true), [
      { percent: 10, shadow: true },
      { percent: 10, shadow: false },
      { percent: 50, shadow: false },
      { percent: 100, shadow: false },
    ]);
    assert.throws(() => parseStages('10,5', false), /goes down from 10 to 5/);
    assert.throws(() => parseStages('10,,50', false), /stage ""/);
    assert.throws(() => parseStages('150', false), /stage "150"/);
  });

  test('bad state files rejected', () => {
    const dir = temporaryDir('fleetlearn-rollout-state-');
    dirs.push(dir);
    mkdirSync(dir, { recursive: true });
    const write = (text: string) => writeFileSync(statePathOf(dir), text);

    assert.equal(readState(dir), undefined);
    write('{');
    assert.throws(() => readState(dir), isFleetCode(ErrorCode.InvalidConfig));
    write('{"format": 7}');
    assert.throws(() => readState(dir), /format 7, expected 1/);
    write('{"format": 1, "version": 1}');
    assert.throws(() => readState(dir), /stableVersion undefined/);
  });

  test('percentile uses nearest rank', () => {
    assert.equal(percentile([], 0.5), 0);
    assert.equal(percentile([5, 1, 3, 2, 4], 0.5), 3);
    assert.equal(percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.95), 10);
  });

  test('held-out frames spread and checked', () => {
    const count = 10;
    const frames = {
      images: new Float32Array(count * 3072),
      labels: Int32Array.from({ length: count }, (_, i) => i),
      count,
      paths: [],
      tracks: [],
    } as unknown as Parameters<typeof holdOutFrames>[0];

    const split = holdOutFrames(frames, 3);

    assert.deepEqual([...split.evaluation!.labels], [0, 3, 6]);
    assert.equal(split.training.count, 7);
    assert.throws(() => holdOutFrames(frames, 10), /evalFrames is 10/);
    assert.throws(() => holdOutFrames(frames, -1), RangeError);
  });
});

describe('candidate notices', () => {
  const onnx = new Uint8Array(100).fill(7);
  const base = buildChunkedRelease(onnx, 3).release;
  const candidate = {
    rolloutId: 'r1',
    state: CandidateState.Active,
    stage: 0,
    cohort: rule(10_000),
    shadow: false,
    stableVersion: 2,
  };

  test('decode rejects bad cohort share', () => {
    const bytes = encodeModelRelease({
      ...base,
      candidate: { ...candidate, cohort: rule(20_000) },
    });

    assert.throws(() => decodeModelRelease(bytes), /20000 basis points/);
  });

  test('report decode rejects inconsistent counts', () => {
    const bytes = encodeVehicleReport(
      report('a', [entry(STABLE, VersionRole.Serving, { correctCount: 41 })]),
    );

    assert.throws(() => decodeVehicleReport(bytes), /41 correct of 40/);
  });

  test('tracker rejects cohort on release topic', () => {
    const offered: number[] = [];
    const dir = temporaryDir('fleetlearn-candidate-');
    dirs.push(dir);
    const tracker = new CandidateTracker({
      vehicleId: 'veh-1',
      tags: {},
      stateDir: dir,
      trustedKeys: undefined,
      offer: (release) => offered.push(release.version),
      setShadow: () => undefined,
      log: silent,
    });

    assert.throws(
      () => tracker.checkStable({ ...base, candidate }),
      isFleetCode(ErrorCode.MalformedPayload),
    );
    assert.throws(
      () => tracker.onCandidatePayload(encodeModelRelease(base)),
      /has no cohort/,
    );
    tracker.onStable({ ...base, version: 2 });
    tracker.onCandidatePayload(encodeModelRelease({ ...base, candidate }));
    const withdrawn = { ...candidate, state: CandidateState.Withdrawn };
    tracker.onCandidatePayload(
      encodeModelRelease({ ...base, candidate: withdrawn }),
    );
    assert.deepEqual(offered, [2, 3, 2]);
  });
});

describe('rollout controller restart', () => {
  test('restart resumes the stage', async () => {
    const workDir = temporaryDir('fleetlearn-rollout-restart-');
    dirs.push(workDir);
    const broker = await startBroker({ port: 0, log: silent });
    const options = {
      fleetId: 'restart-fleet',
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      modelStateDir: workDir,
      rolloutDir: path.join(workDir, 'rollout'),
      maxMessageBytes: 256 * 1024,
      log: silent,
    };
    storeVersion(workDir, 0, readBaseWeights());
    storeVersion(workDir, 1, shiftLastKernel(readBaseWeights(), 0.001));
    const first = new RolloutController(options);
    const second = new RolloutController(options);
    const client = await connectClient(broker.port);
    try {
      await first.connect();
      await first.pin(0);
      await first.start({
        version: 1,
        stages: parseStages('10,50,100', false),
        cohortTags: { region: 'eu' },
        vehicleIds: [],
        gates: DEFAULT_GATES,
      });
      await assert.rejects(
        first.start({
          version: 1,
          stages: parseStages('10', false),
          cohortTags: {},
          vehicleIds: [],
          gates: DEFAULT_GATES,
        }),
        /still active/,
      );
      await first.close();

      const resumed = new RolloutController(options);
      await resumed.connect();
      await resumed.promote('test');
      await resumed.close();
      const notices: Uint8Array[] = [];
      const topics = new FleetTopics('restart-fleet');
      client.on('message', (topic, payload) => {
        if (topic === topics.candidateRelease()) notices.push(payload);
      });
      await client.subscribeAsync(topics.candidateRelease(), { qos: 1 });
      await waitUntil(
        () => notices.length > 0,
        'the retained candidate notice',
        5000,
      );

      const notice = decodeModelRelease(
        decodeSignedRelease(notices[0])?.signedBytes ?? notices[0],
      );
      assert.equal(readState(options.rolloutDir)?.stageIndex, 1);
      assert.equal(notice.candidate?.stage, 1);
      assert.equal(notice.candidate?.cohort.basisPoints, 5000);
      assert.deepEqual(notice.candidate?.cohort.tags, { region: 'eu' });
      await second.connect();
      await assert.rejects(second.pin(9), isFleetCode(ErrorCode.InvalidModel));
    } finally {
      await second.close();
      await endClient(client, 2000);
      await broker.close();
    }
  });
});

describe('rollout vehicle list', () => {
  test('ids with topic wildcards are rejected', () => {
    assert.deepEqual(parseList('veh-001, veh-002'), ['veh-001', 'veh-002']);
    for (const bad of ['a/b', '#', 'veh-+']) {
      assert.throws(() => parseList(bad), /invalid vehicle id/);
    }
    assert.throws(() => parseList('veh-001,,veh-002'), /without empty entries/);
  });
});
