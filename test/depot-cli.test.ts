import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, afterEach, before, describe, test } from 'node:test';
import { Aggregator } from '../aggregator/index.ts';
import type { RunningBroker } from '../broker/index.ts';
import {
  AckStatus,
  decodeUpdateAck,
  encodeModelUpdate,
  type UpdateAck,
} from '../protocol/index.ts';
import {
  FLEET_ID,
  TestVehicle,
  buildUpdate,
  createWorkspace,
  loadRealImages,
  startTestBroker,
  testOptions,
  topics,
  type Workspace,
} from './aggregator-fixtures.ts';
import { waitUntil } from './depot-fixtures.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));

/** A depot command running as a child process. */
interface DepotRun {
  child: ChildProcess;
  exited: Promise<[number | null, string | null]>;
  output: () => string;
  /** Resolves once the output contains `text`, and rejects at exit. */
  reached: (text: string) => Promise<void>;
}

/** Runs aggregator/depot/main.ts with `args`. */
function runDepot(args: string[]): DepotRun {
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', 'aggregator/depot/main.ts', ...args],
    { cwd: REPOSITORY_ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let output = '';
  const collect = (chunk: Buffer): void => {
    output += chunk.toString();
  };
  child.stdout!.on('data', collect);
  child.stderr!.on('data', collect);
  const exited = once(child, 'exit') as Promise<[number | null, string | null]>;
  const reached = (text: string): Promise<void> =>
    Promise.race([
      waitUntil(`"${text}" from the depot`, () =>
        output.includes(text) ? true : undefined,
      ).then(() => undefined),
      exited.then(() => {
        if (!output.includes(text)) {
          throw new Error(`depot exited before "${text}":\n${output}`);
        }
      }),
    ]);
  return { child, exited, output: () => output, reached };
}

/** Counts the lines of `output` with the message `msg`. */
function countLogged(output: string, msg: string): number {
  return output.split('\n').filter((line) => line.includes(`"msg":"${msg}"`))
    .length;
}

describe('depot command line', () => {
  const cases: Array<[string, string[], RegExp]> = [
    ['bad depot id', ['--depot-id', 'a/b'], /invalid depot id "a\/b"/],
    [
      'tls url',
      ['--depot-id', 'a', '--upstream-url', 'mqtts://127.0.0.1:8883'],
      /does not support TLS/,
    ],
    [
      'malformed url',
      ['--depot-id', 'a', '--downstream-url', 'mqtt//nohost'],
      /not a URL/,
    ],
    [
      'same broker both ways',
      [
        '--depot-id',
        'a',
        '--upstream-url',
        'mqtt://127.0.0.1:1884',
        '--downstream-url',
        'mqtt://127.0.0.1:1884',
      ],
      /another broker than upstreamUrl/,
    ],
    [
      'same broker under two names',
      [
        '--depot-id',
        'a',
        '--upstream-url',
        'mqtt://127.0.0.1:1884',
        '--downstream-url',
        'mqtt://localhost:1884',
      ],
      /reaches the same broker as upstreamUrl/,
    ],
    [
      'vehicle keys',
      ['--depot-id', 'a', '--vehicle-keys', 'keys.json'],
      /--vehicle-keys is not supported by the depot/,
    ],
    [
      'robust rule',
      ['--depot-id', 'a', '--aggregation', 'median'],
      /--aggregation median is not supported by the depot/,
    ],
  ];
  for (const [name, args, message] of cases) {
    test(`${name} exits with 2`, async () => {
      const run = runDepot([...args, '--state-dir', '/nonexistent/unused']);

      const [code] = await run.exited;

      assert.equal(code, 2, run.output());
      assert.match(run.output(), message);
    });
  }
});

describe('depot process on real brokers', () => {
  let fleetBroker: RunningBroker;
  let depotBroker: RunningBroker;
  let workspace: Workspace;
  let aggregator: Aggregator | undefined;
  const runs: DepotRun[] = [];
  const vehicles: TestVehicle[] = [];

  before(async () => {
    workspace = createWorkspace(17);
  });

  afterEach(async () => {
    await aggregator?.stop();
    aggregator = undefined;
    for (const run of runs.splice(0)) {
      if (run.child.exitCode === null && run.child.signalCode === null) {
        run.child.kill('SIGKILL');
        await run.exited;
      }
    }
    await Promise.all(vehicles.splice(0).map((vehicle) => vehicle.close()));
    await fleetBroker?.close();
    await depotBroker?.close();
  });

  after(() => workspace?.remove());

  function start(stateDir: string): DepotRun {
    const run = runDepot([
      '--depot-id',
      'depot-a',
      '--fleet-id',
      FLEET_ID,
      '--upstream-url',
      `mqtt://127.0.0.1:${fleetBroker.port}`,
      '--downstream-url',
      `mqtt://127.0.0.1:${depotBroker.port}`,
      '--state-dir',
      stateDir,
      '--log-level',
      'debug',
    ]);
    runs.push(run);
    return run;
  }

  test('sigterm stops with exit 0', async () => {
    fleetBroker = await startTestBroker();
    depotBroker = await startTestBroker();
    const run = start(join(workspace.dir, 'sigterm'));
    await run.reached('"msg":"depot started"');

    run.child.kill('SIGTERM');
    const [code] = await run.exited;

    assert.equal(code, 0, run.output());
    assert.match(run.output(), /"msg":"depot stopped"/);
  });

  test('killed depot loses no update', { timeout: 120_000 }, async () => {
    fleetBroker = await startTestBroker();
    depotBroker = await startTestBroker();
    const stateDir = join(workspace.dir, 'killed');
    const ids = ['veh-1', 'veh-2', 'veh-3'];
    for (const id of ids) {
      vehicles.push(await TestVehicle.connect(depotBroker, id));
    }
    const acks = new Map<string, UpdateAck[]>(ids.map((id) => [id, []]));
    for (const vehicle of vehicles) {
      vehicle.client.on('message', (topic, payload) => {
        if (topic !== topics.ack(vehicle.id)) return;
        acks.get(vehicle.id)!.push(decodeUpdateAck(payload));
      });
    }
    const first = start(stateDir);
    await first.reached('"msg":"depot started"');
    aggregator = new Aggregator(
      testOptions(fleetBroker, workspace, await loadRealImages(), {
        depots: ['depot-a'],
        minVehiclesOnline: 3,
        minUpdates: 3,
        roundTimeoutMs: 60_000,
      }),
    );
    const roundClosed = once(aggregator, 'round-closed', {
      signal: AbortSignal.timeout(90_000),
    });
    roundClosed.catch(() => {}); // awaited below
    await aggregator.start();
    const tasks = await Promise.all(vehicles.map((v) => v.nextTask(30_000)));
    const payloads = vehicles.map((vehicle, index) =>
      encodeModelUpdate(
        buildUpdate(vehicle.id, tasks[index], {
          numExamples: 10 * (index + 1),
        }),
      ),
    );

    // Two updates merged and journaled, then the depot dies unannounced.
    await vehicles[0].publish(payloads[0]);
    await vehicles[1].publish(payloads[1]);
    await waitUntil('two accepted updates', () =>
      countLogged(first.output(), 'update accepted') >= 2 ? true : undefined,
    );
    first.child.kill('SIGKILL');
    await first.exited;
    // As an agent does after a reconnection: the update is still in its outbox.
    await vehicles[0].publish(payloads[0]);
    const second = start(stateDir);
    await second.reached('"msg":"depot started"');
    await vehicles[2].publish(payloads[2]);
    const [closed] = await roundClosed;
    await waitUntil('an ack for every vehicle', () =>
      [...acks.values()].every((list) => list.length > 0) ? true : undefined,
    );
    await new Promise((resolve) => setTimeout(resolve, 500));

    assert.equal(closed.accepted, 3);
    assert.equal(closed.numExamples, 10 + 20 + 30, 'each update counted once');
    assert.match(second.output(), /"restoredUpdates":2/);
    for (const [id, received] of acks) {
      assert.equal(received.length, 1, `acks of ${id}`);
      assert.equal(received[0].status, AckStatus.Accepted, id);
    }
    assert.equal(countLogged(first.output(), 'partial forwarded'), 0);
    assert.equal(countLogged(second.output(), 'partial forwarded'), 1);
  });
});
