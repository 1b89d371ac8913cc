import assert from 'node:assert/strict';
import { once } from 'node:events';
import { describe, test } from 'node:test';
import { connect } from 'mqtt';
import {
  AckStatus,
  ErrorCode,
  FleetError,
  VehicleState,
  decodeTensorValues,
  encodeModelUpdate,
  encodeVehicleStatus,
} from '../protocol/index.ts';
import { endClient } from '../protocol/mqtt-end.ts';
import {
  MAX_RESEND_WAIT_MS,
  partialIdOf,
  resendWaitMs,
  resolveDepotOptions,
} from '../aggregator/depot/index.ts';
import {
  TestVehicle,
  buildDeltas,
  buildUpdate,
  topics,
} from './aggregator-fixtures.ts';
import {
  buildTask,
  forwardTwoUpdates,
  recordAcks,
  recordingLogger,
  sleep,
  useDepotTestBed,
  waitUntil,
} from './depot-fixtures.ts';

describe('depot options', () => {
  const base = {
    depotId: 'depot-a',
    fleetId: 'f',
    upstreamUrl: 'mqtt://127.0.0.1:1883',
    downstreamUrl: 'mqtt://127.0.0.1:1884',
  };
  const cases: Array<[string, Record<string, unknown>]> = [
    ['depot id with a slash', { depotId: 'a/b' }],
    ['empty fleet id', { fleetId: '' }],
    ['malformed upstream url', { upstreamUrl: 'not a url' }],
    ['tls upstream url', { upstreamUrl: 'mqtts://127.0.0.1:8883' }],
    ['websocket downstream url', { downstreamUrl: 'ws://127.0.0.1:1884' }],
    ['same broker both ways', { downstreamUrl: 'mqtt://127.0.0.1:1883/' }],
    ['negative forward margin', { forwardMarginMs: -1 }],
    ['zero ack timeout', { partialAckTimeoutMs: 0 }],
    ['caps beyond exact sums', { maxAbsDeltaValue: 1e6 }],
  ];
  for (const [name, override] of cases) {
    test(`rejects ${name}`, () => {
      assert.throws(
        () => resolveDepotOptions({ ...base, ...override }),
        (err: unknown) =>
          err instanceof FleetError && err.code === ErrorCode.InvalidConfig,
      );
    });
  }

  test('rejects missing depot id', () => {
    assert.throws(
      () => resolveDepotOptions({ ...base, depotId: undefined as never }),
      TypeError,
    );
  });

  test('defaults state dir per depot', () => {
    const resolved = resolveDepotOptions(base);

    assert.equal(resolved.stateDir, 'state/depot-depot-a');
    assert.equal(resolved.forwardMarginMs, 2000);
    assert.equal(resolved.maxExamplesPerUpdate, 1_000_000);
  });
});

describe('depot partial ids and resend waits', () => {
  test('partial id ignores update order', () => {
    const first = partialIdOf('d', 3, ['u1', 'u2']);

    assert.equal(first, partialIdOf('d', 3, ['u2', 'u1']));
    assert.notEqual(first, partialIdOf('d', 3, ['u1']));
    assert.notEqual(first, partialIdOf('d', 4, ['u1', 'u2']));
    assert.notEqual(first, partialIdOf('e', 3, ['u1', 'u2']));
  });

  test('resend waits double within jitter', () => {
    assert.equal(
      resendWaitMs(0, 1000, () => 0),
      1000,
    );
    assert.equal(
      resendWaitMs(1, 1000, () => 0),
      1000,
    );
    assert.equal(
      resendWaitMs(1, 1000, () => 1),
      2000,
    );
    assert.equal(
      resendWaitMs(3, 1000, () => 1),
      8000,
    );
    assert.equal(
      resendWaitMs(20, 1000, () => 1),
      MAX_RESEND_WAIT_MS,
    );
  });
});

describe('depot with a real broker', () => {
  const bed = useDepotTestBed();

  test('bad updates get rejection acks', async () => {
    const task = buildTask(4, ['veh-1']);
    await bed.fleet.publishTask(task);
    const v1 = await bed.vehicle('veh-1');
    const outsider = await bed.vehicle('veh-9');
    await bed.depot();
    const value = (_name: string, index: number) =>
      index === 3 ? Number.NaN : 0.01;
    const wrongShape = buildUpdate('veh-1', task, {
      overrides: { updateId: 'shape' },
    });
    wrongShape.deltas[0] = buildDeltas(['dense2/bias'], () => 0)[0];
    wrongShape.deltas[0].name = 'dense2/kernel';

    const cases: Array<[TestVehicle, Uint8Array, string]> = [
      [v1, Buffer.from('not a protobuf message'), ErrorCode.MalformedPayload],
      [
        v1,
        encodeModelUpdate(
          buildUpdate('veh-1', task, { overrides: { round: 9 } }),
        ),
        ErrorCode.WrongRound,
      ],
      [
        v1,
        encodeModelUpdate(
          buildUpdate('veh-1', task, { value, overrides: { updateId: 'nan' } }),
        ),
        ErrorCode.NonFiniteValue,
      ],
      [v1, encodeModelUpdate(wrongShape), ErrorCode.WrongShape],
      [
        outsider,
        encodeModelUpdate(buildUpdate('veh-9', task)),
        ErrorCode.VehicleNotSelected,
      ],
    ];
    for (const [sender, payload, code] of cases) {
      const ack = await sender.send(payload);

      assert.equal(ack.status, AckStatus.Rejected, code);
      assert.equal(ack.reasonCode, code);
      assert.equal(ack.currentRound, 4, code);
      assert.equal(ack.currentModelVersion, 3, code);
    }
    assert.equal(bed.fleet.partials.length, 0);
  });

  test('update before task is wrong round', async () => {
    const v1 = await bed.vehicle('veh-1');
    await bed.depot();
    const task = buildTask(2, ['veh-1']);

    const ack = await v1.send(encodeModelUpdate(buildUpdate('veh-1', task)));

    assert.equal(ack.status, AckStatus.Rejected);
    assert.equal(ack.reasonCode, ErrorCode.WrongRound);
    assert.equal(ack.currentRound, 0);
  });

  test('vehicles acked only after fleet accepts', async () => {
    const task = buildTask(1, ['veh-1', 'veh-2']);
    await bed.fleet.publishTask(task);
    const v1 = await bed.vehicle('veh-1');
    const v2 = await bed.vehicle('veh-2');
    const acks1 = recordAcks(v1);
    const acks2 = recordAcks(v2);
    const started = await bed.depot();
    const decided = once(started, 'update-decided');

    await v1.publish(
      encodeModelUpdate(
        buildUpdate('veh-1', task, { numExamples: 10, value: () => 0.01 }),
      ),
    );
    const [first] = await decided;
    await sleep(300);

    assert.equal(first.accepted, true);
    assert.equal(bed.fleet.partials.length, 0, 'veh-2 is still awaited');
    assert.equal(acks1.length, 0);

    await v2.publish(
      encodeModelUpdate(
        buildUpdate('veh-2', task, { numExamples: 30, value: () => 0.04 }),
      ),
    );
    const partial = await bed.fleet.nthPartial(1);
    await sleep(300);

    assert.equal(acks1.length + acks2.length, 0, 'no ack before the fleet');
    assert.deepEqual(
      partial.updates.map((entry) => [entry.vehicleId, entry.numExamples]),
      [
        ['veh-1', 10],
        ['veh-2', 30],
      ],
    );
    assert.equal(partial.numExamples, 40);
    assert.equal(partial.round, 1);
    assert.equal(partial.baseModelVersion, 0);
    assert.equal(
      partial.partialId,
      partialIdOf('depot-a', 1, ['veh-1-r1', 'veh-2-r1']),
    );
    for (const tensor of partial.meanDeltas) {
      const values = decodeTensorValues(tensor);
      const expected = Math.fround((10 * 0.01 + 30 * 0.04) / 40);
      assert.ok(
        values.every((v) => Math.abs(v - expected) < 1e-7),
        `${tensor.name} is the weighted mean ${expected}`,
      );
    }

    await bed.fleet.ack(partial, { currentRound: 1, currentModelVersion: 0 });
    const [ack1, ack2] = await Promise.all([
      waitUntil('ack of veh-1', () => acks1[0]),
      waitUntil('ack of veh-2', () => acks2[0]),
    ]);

    assert.equal(ack1.status, AckStatus.Accepted);
    assert.equal(ack1.updateId, 'veh-1-r1');
    assert.equal(ack2.status, AckStatus.Accepted);
    assert.equal(ack2.updateId, 'veh-2-r1');
  });

  test('rejected partial passes reason on', async () => {
    const {
      partial,
      acks: [ack1, ack2],
    } = await forwardTwoUpdates(bed);

    await bed.fleet.ack(partial, {
      status: AckStatus.Rejected,
      reasonCode: ErrorCode.RoundClosed,
      reason: 'round 1 has closed',
      currentRound: 2,
      currentModelVersion: 1,
    });

    for (const ack of await Promise.all([ack1, ack2])) {
      assert.equal(ack.status, AckStatus.Rejected);
      assert.equal(ack.reasonCode, ErrorCode.RoundClosed);
      assert.equal(ack.reason, 'round 1 has closed');
      assert.equal(ack.currentRound, 2);
      assert.equal(ack.currentModelVersion, 1);
    }
  });

  test('unacked partial is resent unchanged', async () => {
    const task = buildTask(1, ['veh-1']);
    await bed.fleet.publishTask(task);
    const v1 = await bed.vehicle('veh-1');
    const { log, lines } = recordingLogger();
    await bed.depot({ partialAckTimeoutMs: 100, log });
    const acks = recordAcks(v1);

    await v1.publish(encodeModelUpdate(buildUpdate('veh-1', task)));
    const third = await bed.fleet.nthPartial(3);

    assert.equal(
      new Set(bed.fleet.partials.map((partial) => partial.partialId)).size,
      1,
    );
    assert.equal(acks.length, 0);
    const retries = lines.filter(
      (line) => line.msg === 'partial not acknowledged, resending',
    );
    assert.ok(retries.length >= 2, `${retries.length} retries logged`);
    assert.equal(retries[0].partialId, third.partialId);

    await bed.fleet.ack(third);
    const ack = await waitUntil('ack of veh-1', () => acks[0]);
    const sent = bed.fleet.partials.length;
    await sleep(500);

    assert.equal(ack.status, AckStatus.Accepted);
    assert.equal(bed.fleet.partials.length, sent, 'no resend after the ack');
  });

  test('late update is rejected round closed', async () => {
    const task = buildTask(1, ['veh-1', 'veh-3']);
    await bed.fleet.publishTask(task);
    const v1 = await bed.vehicle('veh-1');
    // Not online here, so the depot does not wait for it.
    const v3 = await bed.vehicle('veh-3', false);
    await bed.depot();

    await v1.publish(encodeModelUpdate(buildUpdate('veh-1', task)));
    await bed.fleet.nthPartial(1);
    const ack = await v3.send(encodeModelUpdate(buildUpdate('veh-3', task)));

    assert.equal(ack.status, AckStatus.Rejected);
    assert.equal(ack.reasonCode, ErrorCode.RoundClosed);
    assert.equal(ack.currentRound, 1);
    assert.match(ack.reason, /already forwarded/);
  });

  test('forward margin sends partial before deadline', async () => {
    const task = buildTask(1, ['veh-1', 'veh-2'], 3000);
    await bed.fleet.publishTask(task);
    const v1 = await bed.vehicle('veh-1');
    await bed.vehicle('veh-2');
    await bed.depot({ forwardMarginMs: 2000 });

    await v1.publish(encodeModelUpdate(buildUpdate('veh-1', task)));
    const partial = await bed.fleet.nthPartial(1, 5000);
    const sentAtMs = Date.now();

    assert.deepEqual(
      partial.updates.map((entry) => entry.vehicleId),
      ['veh-1'],
    );
    assert.ok(sentAtMs >= task.deadlineMs - 2100, 'not before the margin');
    assert.ok(sentAtMs < task.deadlineMs, 'before the deadline');
  });

  test('new round task resets the round', async () => {
    const first = buildTask(1, ['veh-1', 'veh-2']);
    await bed.fleet.publishTask(first);
    const v1 = await bed.vehicle('veh-1');
    await bed.vehicle('veh-2');
    const started = await bed.depot();
    const decided = once(started, 'update-decided');
    await v1.publish(encodeModelUpdate(buildUpdate('veh-1', first)));
    await decided;

    const roundStarted = once(started, 'round-started');
    await bed.fleet.publishTask(buildTask(2, ['veh-1']));
    await roundStarted;
    const ack = await v1.send(encodeModelUpdate(buildUpdate('veh-1', first)));

    assert.equal(ack.reasonCode, ErrorCode.RoundClosed);
    assert.equal(ack.currentRound, 2);
    assert.equal(bed.fleet.partials.length, 0);
  });

  test('restart merges journaled updates again', async () => {
    const task = buildTask(1, ['veh-1', 'veh-2']);
    await bed.fleet.publishTask(task);
    const v1 = await bed.vehicle('veh-1');
    const v2 = await bed.vehicle('veh-2');
    const first = await bed.depot();
    const decided = once(first, 'update-decided');
    await v1.publish(
      encodeModelUpdate(buildUpdate('veh-1', task, { numExamples: 5 })),
    );
    await decided;
    await first.stop();

    const second = await bed.depot();
    await v2.publish(
      encodeModelUpdate(buildUpdate('veh-2', task, { numExamples: 7 })),
    );
    const partial = await bed.fleet.nthPartial(1);

    assert.deepEqual(
      partial.updates.map((entry) => entry.vehicleId),
      ['veh-1', 'veh-2'],
    );
    assert.equal(partial.numExamples, 12);
    assert.equal(second.options.stateDir, first.options.stateDir);
  });

  test('relays round task and releases down', async () => {
    const task = buildTask(1, ['veh-1']);
    const chunk = Buffer.from([0, 1, 2, 250, 255]);
    const notice = Buffer.from('a release notice, opaque to the depot');
    await bed.fleet.publishTask(task);
    await bed.fleet.client.publishAsync(topics.releaseChunk(3, 0), chunk, {
      qos: 1,
      retain: true,
    });
    await bed.depot();
    // A live message: the fleet broker forwards it with retain 0.
    await bed.fleet.client.publishAsync(topics.release(), notice, {
      qos: 1,
      retain: true,
    });
    await sleep(300);

    const reader = connect(`mqtt://127.0.0.1:${bed.depotBroker.port}`, {
      protocolVersion: 4,
      reconnectPeriod: 0,
    });
    const received = new Map<string, { payload: Buffer; retain: boolean }>();
    reader.on('message', (topic, payload, packet) =>
      received.set(topic, { payload, retain: packet.retain }),
    );
    try {
      await reader.subscribeAsync(`${topics.prefix}/#`, { qos: 1 });
      await waitUntil('three retained messages', () =>
        received.size >= 3 ? true : undefined,
      );
    } finally {
      await endClient(reader, 2000);
    }

    assert.deepEqual(received.get(topics.releaseChunk(3, 0))?.payload, chunk);
    assert.deepEqual(received.get(topics.release())?.payload, notice);
    assert.equal(received.get(topics.roundTask())?.retain, true);
    assert.equal(received.get(topics.release())?.retain, true);
  });

  test('relays statuses and last wills up', async () => {
    await bed.depot();
    const status = encodeVehicleStatus({
      vehicleId: 'veh-7',
      state: VehicleState.Offline,
      modelName: 'gtsrb-cnn',
      modelVersion: 0,
      numExamples: 1,
      updatedAtMs: Date.now(),
      backend: 'test',
      connectionId: 5,
    });
    const vehicleClient = connect(`mqtt://127.0.0.1:${bed.depotBroker.port}`, {
      protocolVersion: 4,
      clientId: 'vehicle-veh-7',
      reconnectPeriod: 0,
      will: {
        topic: topics.status('veh-7'),
        payload: Buffer.from(status),
        qos: 1,
        retain: true,
      },
    });
    await new Promise((resolve) => vehicleClient.once('connect', resolve));
    await vehicleClient.publishAsync(topics.report('veh-7'), Buffer.from('r'), {
      qos: 1,
      retain: true,
    });
    // A lost connection makes the depot broker publish the last will.
    vehicleClient.stream.destroy();
    vehicleClient.end(true);

    const reader = connect(`mqtt://127.0.0.1:${bed.fleetBroker.port}`, {
      protocolVersion: 4,
      reconnectPeriod: 0,
    });
    const received = new Map<string, Buffer>();
    reader.on('message', (topic, payload) => received.set(topic, payload));
    try {
      await reader.subscribeAsync(`${topics.prefix}/vehicles/#`, { qos: 1 });
      await waitUntil('status and report of veh-7', () =>
        received.has(topics.status('veh-7')) &&
        received.has(topics.report('veh-7'))
          ? true
          : undefined,
      );
      // Retained on the fleet broker: a second subscription gets them too.
      received.clear();
      await reader.unsubscribeAsync(`${topics.prefix}/vehicles/#`);
      await reader.subscribeAsync(`${topics.prefix}/vehicles/#`, { qos: 1 });
      await waitUntil('retained status of veh-7', () =>
        received.get(topics.status('veh-7')),
      );
    } finally {
      await endClient(reader, 2000);
    }

    assert.deepEqual(received.get(topics.status('veh-7')), Buffer.from(status));
  });
});
