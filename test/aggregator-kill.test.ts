import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { connect } from 'mqtt';

import type { RunningBroker } from '../broker/index.ts';
import {
  MODEL_NAME,
  loadLabelledImages,
  resolveDataDir,
} from '../models/index.ts';
import {
  AckStatus,
  VehicleState,
  createLogger,
  encodeVehicleStatus,
} from '../protocol/index.ts';
import { VehicleAgent } from '../vehicle-agent/index.ts';
import {
  FLEET_ID,
  createWorkspace,
  fetchRetainedRelease,
  startTestBroker,
  topics,
  type Workspace,
} from './aggregator-fixtures.ts';
import { endClient } from '../protocol/mqtt-end.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));
const IDLE_VEHICLE = 'veh-idle';

function startAggregator(
  broker: RunningBroker,
  workspace: Workspace,
): ChildProcess {
  return spawn(
    process.execPath,
    [
      '--import',
      'tsx',
      'aggregator/main.ts',
      ...['--fleet-id', FLEET_ID],
      ...['--broker-url', `mqtt://127.0.0.1:${broker.port}`],
      ...['--state-dir', join(workspace.dir, 'aggregator')],
      ...['--base-weights', workspace.baseWeightsPath],
      ...['--min-updates', '1'],
      ...['--round-timeout-ms', '60000'],
      ...['--log-level', 'silent'],
    ],
    { cwd: REPOSITORY_ROOT, stdio: 'ignore' },
  );
}

/** Publishes a retained status for a vehicle that never trains. */
async function publishIdleStatus(
  broker: RunningBroker,
  state: number,
): Promise<void> {
  const client = connect(`mqtt://127.0.0.1:${broker.port}`, {
    protocolVersion: 4,
    clientId: `idle-${Math.random().toString(16).slice(2)}`,
  });
  await new Promise<void>((resolve) => client.once('connect', () => resolve()));
  await client.publishAsync(
    topics.status(IDLE_VEHICLE),
    Buffer.from(
      encodeVehicleStatus({
        vehicleId: IDLE_VEHICLE,
        state,
        modelName: MODEL_NAME,
        modelVersion: 0,
        numExamples: 100,
        updatedAtMs: Date.now(),
        connectionId: 0,
        backend: 'none',
      }),
    ),
    { qos: 1, retain: true },
  );
  await endClient(client, 2000);
}

describe('aggregator killed mid-round', () => {
  let broker: RunningBroker;
  let workspace: Workspace;
  let agent: VehicleAgent | undefined;

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace(5);
  });

  after(async () => {
    await agent?.stop();
    await broker.close();
    workspace.remove();
  });

  test(
    'no partial model, next round completes',
    { timeout: 120_000 },
    async () => {
      const frames = await loadLabelledImages(resolveDataDir(), { limit: 100 });
      // The idle vehicle is selected but never sends an update, so round 1 stays
      // open after the real vehicle's update is accepted.
      await publishIdleStatus(broker, VehicleState.Online);
      agent = new VehicleAgent({
        vehicleId: 'veh-real',
        fleetId: FLEET_ID,
        brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
        stateDir: join(workspace.dir, 'vehicle'),
        frames,
        log: createLogger({ level: 'silent' }),
      });
      await agent.start();
      const first = startAggregator(broker, workspace);
      const firstExit = once(first, 'exit');

      const [ack] = (await once(agent, 'ack')) as [
        { status: number; round: number },
      ];
      assert.equal(ack.status, AckStatus.Accepted);
      assert.equal(ack.round, 1);
      first.kill('SIGKILL');
      await firstExit;

      const modelDir = join(workspace.dir, 'aggregator', 'models', MODEL_NAME);
      assert.deepEqual(
        readdirSync(modelDir).filter((name) => name.startsWith('v1')),
        [],
      );
      assert.equal((await fetchRetainedRelease(broker)).version, 0);

      await publishIdleStatus(broker, VehicleState.Offline);
      const deployed = new Promise<void>((resolve) =>
        agent!.on('release-deployed', (event) => {
          if (event.version === 1) resolve();
        }),
      );
      const second = startAggregator(broker, workspace);
      try {
        await deployed;
      } finally {
        second.kill('SIGTERM');
        await once(second, 'exit');
      }

      assert.equal((await fetchRetainedRelease(broker)).version, 1);
      assert.equal(existsSync(join(modelDir, 'v1.onnx')), true);
    },
  );
});
