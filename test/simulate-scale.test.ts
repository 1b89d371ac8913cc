import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { setTimeout as delay } from 'node:timers/promises';
import { after, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { connect, type MqttClient } from 'mqtt';

import type { RunningBroker } from '../broker/index.ts';
import { MODEL_NAME, TENSOR_SPECS } from '../models/index.ts';
import {
  AckStatus,
  ErrorCode,
  VehicleState,
  decodeModelUpdate,
  decodeVehicleStatus,
  encodeRoundTask,
  encodeUpdateAck,
  isFleetError,
  type RoundTask,
} from '../protocol/index.ts';
import { endClient } from '../protocol/mqtt-end.ts';
import { CompressionKind } from '../protocol/compression/index.ts';
import {
  PERTURBATION_RELATIVE,
  buildLightUpdate,
  unsupportedTaskReason,
  type DeltaTemplate,
} from '../scripts/sim/light-deltas.ts';
import { PublishGate } from '../scripts/sim/light-fleet.ts';
import { LightVehicle } from '../scripts/sim/light-vehicle.ts';
import {
  FLEET_ID,
  quietLog,
  startTestBroker,
  topics,
} from './aggregator-fixtures.ts';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DATA_DIR =
  process.env.FLEETLEARN_DATA ?? path.join(REPO_ROOT, '../shared/data/gtsrb32');
const workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-scale-test-'));
const DENSE_TENSORS = [
  'dense1/kernel',
  'dense1/bias',
  'dense2/kernel',
  'dense2/bias',
];
const MIB = 1024 * 1024;

after(() => rmSync(workDir, { recursive: true, force: true }));

interface CommandResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs simulate-scale, killing it after `timeoutMs`. `onStdoutLine` may
 * signal the process while it runs.
 */
function runScale(
  args: string[],
  timeoutMs: number,
  onStdoutLine?: (line: string, pid: number) => void,
): Promise<CommandResult> {
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', 'scripts/simulate-scale.ts', ...args],
    { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stdout = '';
  let stderr = '';
  createInterface({ input: child.stdout }).on('line', (line) => {
    stdout += `${line}\n`;
    onStdoutLine?.(line, child.pid!);
  });
  child.stderr.on('data', (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  return new Promise((resolve) => {
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** Polls `isDone` every 20 ms for at most `timeoutMs`. */
async function waitUntil(
  isDone: () => boolean,
  timeoutMs: number,
): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!isDone() && Date.now() < deadline) await delay(20);
  return isDone();
}

function isRunning(pid: number): boolean {
  return existsSync(`/proc/${pid}`);
}

function fakeTemplate(): DeltaTemplate {
  const deltas = new Map<string, Float32Array>();
  for (const spec of TENSOR_SPECS.filter((s) =>
    DENSE_TENSORS.includes(s.name),
  )) {
    const size = spec.shape.reduce((a, b) => a * b, 1);
    deltas.set(
      spec.name,
      Float32Array.from({ length: size }, (_, i) => (i % 7) * 0.001 - 0.003),
    );
  }
  return {
    deltas,
    numExamples: 100,
    loss: 1,
    accuracy: 0.5,
    durationMs: 1,
    classes: [0],
  };
}

function taskOf(round: number, selected: string[]): RoundTask {
  return {
    fleetId: FLEET_ID,
    round,
    modelName: MODEL_NAME,
    modelVersion: 3,
    selectedVehicles: selected,
    training: {
      localEpochs: 1,
      batchSize: 32,
      learningRate: 0.001,
      proximalMu: 0,
      trainableTensors: DENSE_TENSORS,
      restrictToLocalClasses: true,
    },
    openedAtMs: Date.now(),
    deadlineMs: Date.now() + 60_000,
    minUpdates: 1,
    modelSha256: '0'.repeat(64),
  };
}

describe('simulate-scale command', () => {
  it('closes a 100-vehicle round', { timeout: 150_000 }, async () => {
    const reportPath = path.join(workDir, 'report.json');

    const result = await runScale(
      [
        ...['--vehicles', '100', '--rounds', '1', '--data', DATA_DIR],
        ...['--aggregator-heap-mb', '512', '--publish-window-ms', '5000'],
        ...['--state-dir', path.join(workDir, 'state'), '--report', reportPath],
        '--no-progress',
      ],
      120_000,
    );

    assert.equal(result.code, 0, result.stderr);
    const report = JSON.parse(readFileSync(reportPath, 'utf8'));
    const [round] = report.rounds;
    assert.equal(report.rounds.length, 1);
    assert.equal(round.outcome, 'closed');
    assert.equal(round.trigger, 'all-responded');
    assert.equal(round.selected, 100);
    assert.equal(round.accepted, 100);
    assert.equal(round.rejected, 0);
    assert.equal(round.sent, 100);
    assert.equal(round.acksAccepted, 100);
    assert.equal(round.ackTimeouts, 0);
    assert.equal(round.modelVersion, 1);
    assert.ok(round.uplinkBytes > 100 * 500_000, `uplink ${round.uplinkBytes}`);
    assert.equal(report.unexpectedAcks, 0);
    assert.ok(report.peakPendingUpdates <= 32);
    const heap = report.memory.aggregator;
    // V8 adds its young generation to --max-old-space-size.
    assert.ok(
      heap.heapSizeLimitBytes < 600 * MIB,
      `limit ${heap.heapSizeLimitBytes}`,
    );
    assert.ok(heap.heapUsedPeakBytes < 512 * MIB);
    assert.ok(heap.rssPeakBytes > heap.heapUsedPeakBytes);
    assert.ok(report.memory.broker.rssPeakBytes > 0);
    assert.deepEqual(report.processes.aggregator.exit, {
      code: 0,
      signal: null,
    });
    assert.equal(isRunning(report.processes.aggregator.pid), false);
    assert.equal(isRunning(report.processes.broker.pid), false);
    assert.match(result.stdout, /all-responded/);
  });

  it('stops its children on SIGINT', { timeout: 150_000 }, async () => {
    const pids: number[] = [];

    const result = await runScale(
      [
        ...['--vehicles', '20', '--data', DATA_DIR, '--log-level', 'info'],
        ...['--state-dir', path.join(workDir, 'state-sigint'), '--no-progress'],
      ],
      120_000,
      (line, driverPid) => {
        if (!line.startsWith('{')) return;
        const record = JSON.parse(line);
        if (
          record.msg === 'broker started' ||
          record.msg === 'aggregator started'
        ) {
          pids.push(Number(record.childPid));
        }
        if (record.msg === 'aggregator started')
          process.kill(driverPid, 'SIGINT');
      },
    );

    assert.equal(result.code, 130, result.stderr);
    assert.equal(pids.length, 2);
    for (const pid of pids) assert.equal(isRunning(pid), false, `pid ${pid}`);
  });

  const badInputs: Array<[string, string[], RegExp]> = [
    [
      'vehicles below 1',
      ['--vehicles', '0'],
      /--vehicles.*expected an integer >= 1, got 0/,
    ],
    [
      'missing data directory',
      ['--data', '/nonexistent/data'],
      /DATA_NOT_FOUND/,
    ],
    [
      'missing base weights',
      ['--base-weights', '/nonexistent.pb'],
      /nonexistent\.pb not found.*INVALID_CONFIG/,
    ],
    ['unknown layer', ['--train-layers', 'dense9'], /dense9.*INVALID_CONFIG/],
    [
      'fewer images than templates',
      ['--templates', '4', '--template-images', '3'],
      /--template-images 3.*INVALID_CONFIG/,
    ],
  ];
  for (const [name, args, pattern] of badInputs) {
    it(`rejects ${name}`, { timeout: 60_000 }, async () => {
      const result = await runScale(['--data', DATA_DIR, ...args], 50_000);

      assert.equal(result.code, 1);
      assert.match(result.stderr, pattern);
    });
  }
});

describe('light updates', () => {
  it('perturb deterministically per vehicle', () => {
    const template = fakeTemplate();
    const task = taskOf(2, []);
    const input = { task, template, numExamples: 50, seed: 9, updateId: 'u1' };

    const first = buildLightUpdate({ ...input, vehicleId: 'veh-a' });
    const again = buildLightUpdate({ ...input, vehicleId: 'veh-a' });
    const other = buildLightUpdate({ ...input, vehicleId: 'veh-b' });

    assert.deepEqual(first.deltas[0].data, again.deltas[0].data);
    assert.notDeepEqual(first.deltas[0].data, other.deltas[0].data);
    assert.equal(first.baseModelVersion, 3);
    assert.equal(first.numExamples, 50);
    const sent = new Float32Array(first.deltas[0].data.slice().buffer);
    const base = template.deltas.get('dense1/kernel')!;
    for (let i = 0; i < 50; i++) {
      const bound = Math.abs(base[i]) * PERTURBATION_RELATIVE + 1e-9;
      assert.ok(Math.abs(sent[i] - base[i]) <= bound, `value ${i}`);
    }
  });

  it('rejects a tensor the templates lack', () => {
    const task = taskOf(1, []);
    task.training.trainableTensors = ['conv1/kernel'];

    assert.throws(
      () =>
        buildLightUpdate({
          task,
          template: fakeTemplate(),
          vehicleId: 'veh-a',
          updateId: 'u1',
          numExamples: 1,
          seed: 1,
        }),
      (err: unknown) => isFleetError(err, ErrorCode.WrongTensors),
    );
  });

  it('skips tasks it cannot answer', () => {
    const nowMs = Date.now();
    const compressed = {
      ...taskOf(1, []),
      compression: { kind: CompressionKind.Int8, topkDensity: 0 },
    };
    const secure = {
      ...taskOf(1, []),
      secureAggregation: {
        threshold: 2,
        clipNorm: 1,
        exampleCap: 0,
        maxVehicles: 3,
        tensorNames: DENSE_TENSORS,
      },
    };
    const late = { ...taskOf(1, []), deadlineMs: nowMs - 1 };

    assert.equal(unsupportedTaskReason(taskOf(1, []), nowMs), undefined);
    assert.match(unsupportedTaskReason(compressed, nowMs) ?? '', /int8/);
    assert.match(unsupportedTaskReason(secure, nowMs) ?? '', /secure/);
    assert.match(unsupportedTaskReason(late, nowMs) ?? '', /deadline/);
  });

  it('gate holds at most maxPending', async () => {
    const gate = new PublishGate(2);
    const first = await gate.acquire();
    await gate.acquire();
    let isThirdIn = false;
    const third = gate.acquire().then((release) => {
      isThirdIn = true;
      return release;
    });

    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(isThirdIn, false);
    first();
    first();
    (await third)();

    assert.equal(isThirdIn, true);
    assert.equal(gate.peakPending, 2);
    assert.throws(() => new PublishGate(-1), RangeError);
  });

  it('vehicle rejects empty templates', () => {
    const options = {
      vehicleId: 'veh-a',
      fleetId: FLEET_ID,
      brokerUrl: 'mqtt://127.0.0.1:1',
      templates: [],
      seed: 1,
      publishWindowMs: 0,
      ackTimeoutMs: 1000,
      maxMessageBytes: 1 << 24,
      gate: new PublishGate(0),
      log: quietLog,
    };

    assert.throws(() => new LightVehicle(options), RangeError);
    assert.throws(
      () =>
        new LightVehicle({
          ...options,
          templates: [fakeTemplate()],
          vehicleId: 'a/b',
        }),
      RangeError,
    );
  });
});

describe('light vehicle protocol', () => {
  let broker: RunningBroker;
  let aggregator: MqttClient;
  const vehicles: LightVehicle[] = [];

  after(async () => {
    await Promise.all(vehicles.map((vehicle) => vehicle.stop()));
    await endClient(aggregator, 2000);
    await broker.close();
  });

  it('sends when selected and counts acks', { timeout: 30_000 }, async () => {
    broker = await startTestBroker();
    aggregator = connect(`mqtt://127.0.0.1:${broker.port}`, {
      protocolVersion: 4,
    });
    await new Promise((resolve) => aggregator.once('connect', resolve));
    const statuses = new Map<string, number>();
    const updates: string[] = [];
    aggregator.on('message', (topic, payload) => {
      const vehicleId = topics.vehicleIdOf(topic)!;
      if (topic === topics.status(vehicleId)) {
        statuses.set(vehicleId, decodeVehicleStatus(payload).state);
        return;
      }
      const update = decodeModelUpdate(payload);
      updates.push(vehicleId);
      const ack = (updateId: string, status: number, reasonCode: string) =>
        aggregator.publishAsync(
          topics.ack(vehicleId),
          Buffer.from(
            encodeUpdateAck({
              updateId,
              round: update.round,
              status,
              reasonCode,
              reason: reasonCode,
              currentRound: update.round,
              currentModelVersion: 3,
            }),
          ),
          { qos: 1 },
        );
      void ack('not-sent-by-vehicle', AckStatus.Accepted, '');
      void ack(update.updateId, AckStatus.Rejected, ErrorCode.WrongRound);
    });
    await aggregator.subscribeAsync([topics.allStatus(), topics.allUpdates()], {
      qos: 1,
    });
    const gate = new PublishGate(1);
    const events: string[] = [];
    for (const vehicleId of ['veh-sel', 'veh-idle']) {
      const vehicle = new LightVehicle({
        vehicleId,
        fleetId: FLEET_ID,
        brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
        templates: [fakeTemplate()],
        seed: 1,
        publishWindowMs: 100,
        ackTimeoutMs: 10_000,
        maxMessageBytes: 1 << 24,
        gate,
        log: quietLog,
      });
      vehicle.on('unexpected-ack', () => events.push('unexpected'));
      vehicles.push(vehicle);
      await vehicle.start(5000);
    }
    const acked = new Promise<unknown[]>((resolve) =>
      vehicles[0].once('ack', (event) => resolve([event])),
    );

    await aggregator.publishAsync(
      topics.roundTask(),
      Buffer.from(encodeRoundTask(taskOf(4, ['veh-sel']))),
      { qos: 1, retain: true },
    );
    const [event] = (await acked) as [
      { accepted: boolean; reasonCode: string; round: number },
    ];
    await vehicles[1].stop();
    const offline = await waitUntil(
      () => statuses.get('veh-idle') === VehicleState.Offline,
      5000,
    );

    assert.equal(event.accepted, false);
    assert.equal(event.reasonCode, ErrorCode.WrongRound);
    assert.equal(event.round, 4);
    assert.deepEqual(updates, ['veh-sel']);
    assert.deepEqual(events, ['unexpected']);
    assert.equal(vehicles[0].pendingCount, 0);
    assert.equal(statuses.get('veh-sel'), VehicleState.Online);
    assert.equal(offline, true, 'veh-idle OFFLINE status');
  });
});
