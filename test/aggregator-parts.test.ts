import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { selectVehicles } from '../aggregator/selection.ts';
import { loadState, saveState } from '../aggregator/state.ts';
import { VehicleRegistry, waitForVehicles } from '../aggregator/vehicles.ts';
import {
  ErrorCode,
  FleetError,
  VehicleState,
  createLogger,
  encodeVehicleStatus,
  type VehicleStatus,
} from '../protocol/index.ts';

const log = createLogger({ level: 'silent' });
const IDS = Array.from(
  { length: 20 },
  (_, i) => `veh-${String(i).padStart(2, '0')}`,
);

function status(vehicleId: string, state: number): VehicleStatus {
  return {
    vehicleId,
    state,
    modelName: 'gtsrb-cnn',
    modelVersion: 0,
    numExamples: 1,
    updatedAtMs: 1,
    connectionId: 0,
    backend: 'cpu',
  };
}

describe('selectVehicles', () => {
  test('zero count selects everyone', () => {
    assert.deepEqual(selectVehicles(['b', 'a', 'b'], 0, 1, 1), ['a', 'b']);
    assert.deepEqual(selectVehicles(['b', 'a'], 5, 1, 1), ['a', 'b']);
  });

  test('same seed and round repeat', () => {
    const first = selectVehicles(IDS, 5, 42, 3);
    const shuffled = selectVehicles([...IDS].reverse(), 5, 42, 3);

    assert.equal(first.length, 5);
    assert.equal(new Set(first).size, 5);
    assert.deepEqual(shuffled, first);
    assert.deepEqual([...first].sort(), first);
  });

  test('rounds draw different samples', () => {
    const samples = new Set(
      [1, 2, 3, 4, 5].map((round) => selectVehicles(IDS, 5, 42, round).join()),
    );

    assert.ok(samples.size > 1);
  });

  test('negative count rejected', () => {
    assert.throws(() => selectVehicles(IDS, -1, 1, 1), RangeError);
  });
});

describe('VehicleRegistry', () => {
  test('tracks online and offline', () => {
    const registry = new VehicleRegistry();

    assert.equal(registry.update('a', status('a', VehicleState.Online)), true);
    assert.equal(
      registry.update('a', status('a', VehicleState.Training)),
      false,
    );
    assert.equal(registry.update('b', status('b', VehicleState.Online)), true);
    assert.equal(registry.update('a', status('a', VehicleState.Offline)), true);
    assert.equal(registry.update('b', undefined), true);

    assert.deepEqual(registry.onlineIds(), []);
  });

  test('status messages decoded and checked', () => {
    const registry = new VehicleRegistry();
    const online = encodeVehicleStatus(status('a', VehicleState.Online));

    registry.applyStatusMessage('a', online, log);
    registry.applyStatusMessage('b', online, log);
    registry.applyStatusMessage('c', Uint8Array.from([0xff, 0xff]), log);
    assert.deepEqual(registry.onlineIds(), ['a']);

    registry.applyStatusMessage('a', new Uint8Array(0), log);
    assert.deepEqual(registry.onlineIds(), []);
  });

  test('older connection status ignored', () => {
    const registry = new VehicleRegistry();
    const training = {
      ...status('a', VehicleState.Training),
      connectionId: 20,
    };
    const staleWill = {
      ...status('a', VehicleState.Offline),
      connectionId: 10,
    };
    const will = { ...status('a', VehicleState.Offline), connectionId: 20 };

    registry.applyStatusMessage('a', encodeVehicleStatus(training), log);
    registry.applyStatusMessage('a', encodeVehicleStatus(staleWill), log);
    assert.deepEqual(registry.onlineIds(), ['a']);

    registry.applyStatusMessage('a', encodeVehicleStatus(will), log);
    assert.deepEqual(registry.onlineIds(), []);
  });

  test('wait ends when target online', async () => {
    const registry = new VehicleRegistry();
    const signal = new AbortController().signal;
    const waiting = waitForVehicles(registry, {
      target: 2,
      minimum: 1,
      timeoutMs: 10_000,
      signal,
      log,
    });

    registry.update('a', status('a', VehicleState.Online));
    registry.update('b', status('b', VehicleState.Online));

    assert.deepEqual(await waiting, ['a', 'b']);
  });

  test('wait accepts minimum after timeout', async () => {
    const registry = new VehicleRegistry();
    registry.update('a', status('a', VehicleState.Online));
    const startedMs = Date.now();

    const online = await waitForVehicles(registry, {
      target: 3,
      minimum: 1,
      timeoutMs: 200,
      signal: new AbortController().signal,
      log,
    });

    assert.deepEqual(online, ['a']);
    assert.ok(Date.now() - startedMs >= 190);
  });

  test('wait returns undefined on abort', async () => {
    const registry = new VehicleRegistry();
    const controller = new AbortController();
    const waiting = waitForVehicles(registry, {
      target: 1,
      minimum: 1,
      timeoutMs: 10_000,
      signal: controller.signal,
      log,
    });

    controller.abort();

    assert.equal(await waiting, undefined);
  });
});

describe('aggregator state file', () => {
  test('state round trip', () => {
    const dir = mkdtempSync(join(tmpdir(), 'fleetlearn-state-'));
    try {
      assert.equal(loadState(dir), undefined);

      saveState(dir, { round: 4, modelVersion: 3 });

      assert.deepEqual(loadState(dir), { round: 4, modelVersion: 3 });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('corrupt state rejected', () => {
    const dir = mkdtempSync(join(tmpdir(), 'fleetlearn-state-'));
    const isInvalidConfig = (err: unknown): boolean =>
      err instanceof FleetError && err.code === ErrorCode.InvalidConfig;
    try {
      writeFileSync(join(dir, 'state.json'), '{"round": 2');
      assert.throws(() => loadState(dir), isInvalidConfig);

      writeFileSync(
        join(dir, 'state.json'),
        '{"round": -1, "modelVersion": 0}',
      );
      assert.throws(() => loadState(dir), isInvalidConfig);

      writeFileSync(join(dir, 'state.json'), 'null');
      assert.throws(() => loadState(dir), isInvalidConfig);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
