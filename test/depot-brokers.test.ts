import assert from 'node:assert/strict';
import { once } from 'node:events';
import {
  createServer,
  connect as connectTcp,
  type AddressInfo,
  type Socket,
} from 'node:net';
import { afterEach, beforeEach, describe, test } from 'node:test';
import { connect } from 'mqtt';
import type { RunningBroker } from '../broker/index.ts';
import {
  AckStatus,
  ErrorCode,
  FleetError,
  encodeModelUpdate,
} from '../protocol/index.ts';
import { endClient } from '../protocol/mqtt-end.ts';
import {
  Depot,
  assertDistinctBrokers,
  type HostLookup,
} from '../aggregator/depot/index.ts';
import {
  TestVehicle,
  buildUpdate,
  quietLog,
  startTestBroker,
  topics,
} from './aggregator-fixtures.ts';
import {
  FakeFleet,
  buildTask,
  createStateDir,
  depotOptions,
  recordingLogger,
  sleep,
  waitUntil,
} from './depot-fixtures.ts';

/** TCP forwarder on 127.0.0.1 that gives one broker a second address. */
interface PortForward {
  port: number;
  close(): Promise<void>;
}

async function forwardPort(targetPort: number): Promise<PortForward> {
  const sockets = new Set<Socket>();
  const server = createServer((incoming) => {
    const outgoing = connectTcp(targetPort, '127.0.0.1');
    sockets.add(incoming);
    sockets.add(outgoing);
    const destroy = (): void => {
      incoming.destroy();
      outgoing.destroy();
    };
    for (const socket of [incoming, outgoing]) {
      socket.on('error', destroy);
      socket.on('close', destroy);
    }
    incoming.pipe(outgoing).pipe(incoming);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  // address() returns an AddressInfo for a TCP server that is listening.
  const { port } = server.address() as AddressInfo;
  return {
    port,
    close: async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** Builds a HostLookup from a table of host names. */
function lookupFrom(table: Record<string, string[]>): HostLookup {
  return async (hostname) => {
    const addresses = table[hostname];
    if (addresses === undefined) throw new Error(`ENOTFOUND ${hostname}`);
    return addresses;
  };
}

describe('same-broker check at start', () => {
  const lookup = lookupFrom({
    'fleet.example': ['10.0.0.1'],
    'depot.example': ['10.0.0.2', '::ffff:10.0.0.1'],
    'other.example': ['10.0.0.3'],
  });

  test('shared address on one port rejected', async () => {
    await assert.rejects(
      assertDistinctBrokers(
        'mqtt://fleet.example:1883',
        'mqtt://depot.example',
        quietLog,
        lookup,
      ),
      (err: unknown) =>
        err instanceof FleetError &&
        err.code === ErrorCode.InvalidConfig &&
        /10\.0\.0\.1/.test(err.message),
    );
  });

  test('other port or address accepted', async () => {
    await assertDistinctBrokers(
      'mqtt://fleet.example:1883',
      'mqtt://depot.example:1884',
      quietLog,
      lookup,
    );
    await assertDistinctBrokers(
      'mqtt://fleet.example:1883',
      'mqtt://other.example:1883',
      quietLog,
      lookup,
    );
  });

  test('unresolved host skips the check', async () => {
    const { log, lines } = recordingLogger();

    await assertDistinctBrokers(
      'mqtt://fleet.example:1883',
      'mqtt://missing.example:1883',
      log,
      lookup,
    );

    assert.ok(
      lines.some(
        (line) =>
          line.msg === 'broker host not resolved, same-broker check skipped',
      ),
    );
  });
});

describe('depot brokers', () => {
  let fleetBroker: RunningBroker;
  let depotBroker: RunningBroker;
  let state: { dir: string; remove(): void };
  const depots: Depot[] = [];
  const cleanups: Array<() => Promise<void>> = [];

  beforeEach(async () => {
    fleetBroker = await startTestBroker();
    depotBroker = await startTestBroker();
    state = createStateDir();
  });

  afterEach(async () => {
    await Promise.all(depots.splice(0).map((depot) => depot.stop()));
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
    await fleetBroker.close();
    await depotBroker.close();
    state.remove();
  });

  test('localhost and 127.0.0.1 rejected', async () => {
    const depot = new Depot(
      depotOptions(fleetBroker, depotBroker, state.dir, {
        downstreamUrl: `mqtt://localhost:${fleetBroker.port}`,
      }),
    );
    depots.push(depot);

    await assert.rejects(
      depot.start(),
      (err: unknown) =>
        err instanceof FleetError &&
        err.code === ErrorCode.InvalidConfig &&
        /reaches the same broker/.test(err.message),
    );
  });

  test('forwarded own copies not relayed', async () => {
    const forward = await forwardPort(fleetBroker.port);
    cleanups.push(() => forward.close());
    const fleet = await FakeFleet.connect(fleetBroker);
    cleanups.push(() => fleet.close());
    await fleet.publishTask(buildTask(1, ['veh-1']));
    const spy = connect(`mqtt://127.0.0.1:${fleetBroker.port}`, {
      protocolVersion: 4,
      reconnectPeriod: 0,
    });
    cleanups.push(() => endClient(spy, 2000));
    let taskCopies = 0;
    let statusCopies = 0;
    spy.on('message', (topic) => {
      if (topic === topics.roundTask()) taskCopies += 1;
      if (topic === topics.status('veh-1')) statusCopies += 1;
    });
    await spy.subscribeAsync([topics.roundTask(), topics.status('veh-1')], {
      qos: 1,
    });
    const { log, lines } = recordingLogger();
    // Different ports, so the address check cannot tell: one broker.
    const depot = new Depot(
      depotOptions(fleetBroker, depotBroker, state.dir, {
        downstreamUrl: `mqtt://127.0.0.1:${forward.port}`,
        log,
      }),
    );
    depots.push(depot);
    await depot.start();
    const vehicle = await TestVehicle.connect(fleetBroker, 'veh-1');
    cleanups.push(() => vehicle.close());
    await sleep(1500);

    // Tasks: the retained one, the fleet's and the depot's copy. Statuses:
    // the vehicle's and the copy.
    assert.ok(taskCopies <= 3, `${taskCopies} round task messages`);
    assert.ok(statusCopies <= 2, `${statusCopies} status messages`);
    const skipped = lines.filter(
      (line) => line.msg === 'copy of the last relayed message skipped',
    );
    assert.ok(skipped.length >= 2, `${skipped.length} copies skipped`);
  });

  test('second depot with same id stops', { timeout: 60_000 }, async () => {
    const fleet = await FakeFleet.connect(fleetBroker);
    cleanups.push(() => fleet.close());
    const task = buildTask(1, ['veh-1'], 60_000);
    await fleet.publishTask(task);
    const { log, lines } = recordingLogger();
    const first = new Depot(
      depotOptions(fleetBroker, depotBroker, state.dir, { log }),
    );
    depots.push(first);
    const firstFailures: Error[] = [];
    first.on('failed', (err) => firstFailures.push(err));
    await first.start();
    const otherBroker = await startTestBroker();
    cleanups.push(() => otherBroker.close());
    const otherState = createStateDir();
    cleanups.push(async () => otherState.remove());
    const second = new Depot(
      depotOptions(fleetBroker, otherBroker, otherState.dir),
    );
    depots.push(second);
    const failed = once(second, 'failed', {
      signal: AbortSignal.timeout(20_000),
    });
    failed.catch(() => {}); // awaited below

    // The second depot may notice the first while it starts or just after,
    // so start() may reject or resolve.
    await second.start().catch(() => undefined);
    const [error] = await failed;

    assert.ok(error instanceof FleetError, String(error));
    assert.equal(error.code, ErrorCode.InvalidConfig);
    assert.match(error.message, /depot id depot-a is in use/);
    await waitUntil('the first depot noticing the second', () =>
      lines.find(
        (line) =>
          line.msg ===
          'another depot aggregator uses this depot id, the later one stops',
      ),
    );

    // The first one still works once the second has gone.
    const v1 = await TestVehicle.connect(depotBroker, 'veh-1');
    cleanups.push(() => v1.close());
    const ack = v1.nextAck(30_000);
    await v1.publish(encodeModelUpdate(buildUpdate('veh-1', task)));
    await fleet.ack(await fleet.nthPartial(1, 30_000));

    assert.equal((await ack).status, AckStatus.Accepted);
    assert.deepEqual(firstFailures, []);
  });
});
