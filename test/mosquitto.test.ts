import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import {
  createServer,
  connect as connectTcp,
  type AddressInfo,
} from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { Aggregator, type RoundClosedEvent } from '../aggregator/index.ts';
import { loadLabelledImages, subset } from '../models/index.ts';
import { createLogger } from '../protocol/index.ts';
import { VehicleAgent } from '../vehicle-agent/index.ts';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DATA_DIR =
  process.env.FLEETLEARN_DATA ??
  path.resolve(REPO_ROOT, '../shared/data/gtsrb32');
const BASE_WEIGHTS = path.join(
  REPO_ROOT,
  'models/base/gtsrb-cnn-v0.weights.pb',
);
const silent = createLogger({ level: 'silent' });

/** Returns the Mosquitto binary, or undefined when it is not installed. */
function findMosquitto(): string | undefined {
  return ['mosquitto', '/usr/sbin/mosquitto'].find(
    (binary) =>
      spawnSync(binary, ['-h'], { stdio: 'ignore' }).error === undefined,
  );
}

async function freePort(): Promise<number> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  server.close();
  await once(server, 'close');
  return port;
}

async function waitForPort(port: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const open = await new Promise<boolean>((resolve) => {
      const socket = connectTcp(port, '127.0.0.1');
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (open) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(
    `mosquitto did not listen on port ${port} within ${timeoutMs} ms`,
  );
}

const mosquitto = findMosquitto();

describe(
  'round through mosquitto',
  {
    skip:
      mosquitto === undefined
        ? 'mosquitto not installed (Debian package mosquitto)'
        : false,
  },
  () => {
    const workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-mosquitto-'));
    let broker: ChildProcess | undefined;
    let brokerUrl = '';

    before(async () => {
      const port = await freePort();
      const config = path.join(workDir, 'mosquitto.conf');
      writeFileSync(
        config,
        `listener ${port} 127.0.0.1\nallow_anonymous true\npersistence false\n`,
      );
      broker = spawn(mosquitto!, ['-c', config], { stdio: 'ignore' });
      await waitForPort(port, 10_000);
      brokerUrl = `mqtt://127.0.0.1:${port}`;
    });

    after(() => {
      broker?.kill('SIGTERM');
      rmSync(workDir, { recursive: true, force: true });
    });

    test('two vehicles complete one round', async () => {
      const frames = await loadLabelledImages(DATA_DIR, {
        split: 'train',
        limit: 400,
      });
      const test = await loadLabelledImages(DATA_DIR, {
        split: 'test',
        limit: 200,
      });
      const halves = [
        subset(
          frames,
          Array.from({ length: 200 }, (_, i) => i),
        ),
        subset(
          frames,
          Array.from({ length: 200 }, (_, i) => i + 200),
        ),
      ];
      const aggregator = new Aggregator({
        fleetId: 'mosquitto-fleet',
        brokerUrl,
        stateDir: path.join(workDir, 'aggregator'),
        baseWeightsPath: BASE_WEIGHTS,
        minVehiclesOnline: 2,
        minUpdates: 2,
        roundTimeoutMs: 60_000,
        maxRounds: 1,
        testSet: { images: test.images, labels: test.labels },
        log: silent,
      });
      const agents = halves.map(
        (share, index) =>
          new VehicleAgent({
            vehicleId: `veh-m${index + 1}`,
            fleetId: 'mosquitto-fleet',
            brokerUrl,
            stateDir: path.join(workDir, `vehicle-${index + 1}`),
            frames: share,
            log: silent,
          }),
      );
      const closed: RoundClosedEvent[] = [];
      aggregator.on('round-closed', (event) => closed.push(event));
      const versionOne = agents.map(
        (agent) =>
          new Promise<void>((resolve) =>
            agent.on('release-deployed', (event) => {
              if (event.version === 1) resolve();
            }),
          ),
      );
      let deployedVersions: (number | undefined)[] = [];

      try {
        await aggregator.start();
        await Promise.all(agents.map((agent) => agent.start()));
        await aggregator.whenFinished();
        await Promise.all(versionOne);
        deployedVersions = agents.map((agent) => agent.deployedVersion);
      } finally {
        await aggregator.stop();
        await Promise.allSettled(agents.map((agent) => agent.stop()));
      }

      assert.equal(closed.length, 1);
      assert.equal(closed[0].accepted, 2);
      assert.equal(closed[0].rejected, 0);
      assert.equal(closed[0].modelVersion, 1);
      assert.deepEqual(deployedVersions, [1, 1]);
    });
  },
);
