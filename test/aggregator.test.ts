import assert from 'node:assert/strict';
import { once } from 'node:events';
import { after, before, describe, test } from 'node:test';
import {
  Aggregator,
  type RoundClosedEvent,
  type RoundOpenedEvent,
} from '../aggregator/index.ts';
import {
  AckStatus,
  ErrorCode,
  TensorEncoding,
  encodeFloat32Tensor,
  encodeModelUpdate,
  type RoundTask,
  type UpdateAck,
} from '../protocol/index.ts';
import { importOnnxWeights, sha256Hex } from '../models/index.ts';
import type { RunningBroker } from '../broker/index.ts';
import {
  TestVehicle,
  buildDeltas,
  buildUpdate,
  createWorkspace,
  fetchRetainedRelease,
  loadRealImages,
  startTestBroker,
  testOptions,
  topics,
  type RealImages,
  type Workspace,
} from './aggregator-fixtures.ts';

let images: RealImages;

before(async () => {
  images = await loadRealImages();
});

function assertRejected(ack: UpdateAck, code: string): void {
  assert.equal(
    ack.status,
    AckStatus.Rejected,
    `expected ${code}, got ${ack.reasonCode}`,
  );
  assert.equal(ack.reasonCode, code);
  assert.ok(ack.reason.length > 0);
}

function assertAccepted(ack: UpdateAck): void {
  assert.equal(
    ack.status,
    AckStatus.Accepted,
    `rejected: ${ack.reasonCode} ${ack.reason}`,
  );
  assert.equal(ack.reasonCode, '');
}

describe('aggregator round', () => {
  let broker: RunningBroker;
  let workspace: Workspace;
  let vehicles: TestVehicle[] = [];
  let aggregator: Aggregator | undefined;

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace();
  });

  after(async () => {
    await aggregator?.stop();
    await Promise.all(vehicles.map((vehicle) => vehicle.close()));
    await broker.close();
    workspace.remove();
  });

  test('three vehicles averaged exactly', async () => {
    vehicles = await Promise.all(
      ['veh-a', 'veh-b', 'veh-c'].map((id) => TestVehicle.connect(broker, id)),
    );
    aggregator = new Aggregator(
      testOptions(broker, workspace, images, {
        minVehiclesOnline: 3,
        minUpdates: 3,
        testSet: images.testSet,
      }),
    );
    const opened = once(aggregator, 'round-opened');
    const closed = once(aggregator, 'round-closed');
    await aggregator.start();
    const [openedEvent] = (await opened) as [RoundOpenedEvent];
    const task: RoundTask = await vehicles[0].nextTask();

    assert.deepEqual(openedEvent.selected, ['veh-a', 'veh-b', 'veh-c']);
    assert.equal(task.round, 1);
    assert.equal(task.modelVersion, 0);
    assert.deepEqual(task.training.trainableTensors, [
      'dense1/kernel',
      'dense1/bias',
      'dense2/kernel',
      'dense2/bias',
    ]);
    assert.equal(task.minUpdates, 3);

    // Vehicle k sends delta scale_k * (1 + i % 5) / 1000 with n_k examples.
    const plan = [
      { scale: 1, numExamples: 10 },
      { scale: 2, numExamples: 20 },
      { scale: 4, numExamples: 30 },
    ];
    const acks = await Promise.all(
      vehicles.map((vehicle, k) => {
        const update = buildUpdate(vehicle.id, task, {
          numExamples: plan[k].numExamples,
          value: (_name, i) => (plan[k].scale * (1 + (i % 5))) / 1000,
        });
        return vehicle.send(encodeModelUpdate(update));
      }),
    );
    for (const ack of acks) assertAccepted(ack);

    const [event] = (await closed) as [RoundClosedEvent];
    assert.equal(event.round, 1);
    assert.equal(event.modelVersion, 1);
    assert.equal(event.accepted, 3);
    assert.equal(event.rejected, 0);
    assert.equal(event.numExamples, 60);
    assert.ok(event.uplinkBytes > 3 * 4 * (1024 * 128));
    assert.ok(event.releaseBytes > 0);
    assert.equal(typeof event.accuracy, 'number');
    assert.ok(event.accuracy! >= 0);
    assert.ok(event.accuracy! <= 1);
    assert.ok(event.exportMaxAbsDiff <= 1e-4);
    assert.equal(aggregator.currentModelVersion, 1);

    // Weighted mean of the scales: (10*1 + 20*2 + 30*4) / 60 = 170 / 60.
    const release = await fetchRetainedRelease(broker);
    assert.equal(release.version, 1);
    assert.equal(release.parentVersion, 0);
    assert.equal(release.round, 1);
    assert.equal(release.sha256, sha256Hex(release.onnx));
    assert.equal(release.sizeBytes, release.onnx.byteLength);
    assert.equal(release.numExamples, 60);
    assert.equal(release.numVehicles, 3);
    const released = importOnnxWeights(release.onnx);
    const base = workspace.baseWeights;
    for (const index of [0, 7, 42]) {
      const expected =
        base.get('dense2/bias')![index] +
        ((170 / 60) * (1 + (index % 5))) / 1000;
      assert.ok(
        Math.abs(released.get('dense2/bias')![index] - expected) < 1e-6,
        `dense2/bias[${index}] = ${released.get('dense2/bias')![index]}, expected ${expected}`,
      );
    }
    assert.deepEqual(released.get('conv1/kernel'), base.get('conv1/kernel'));
  });
});

describe('aggregator rejects bad updates', () => {
  let broker: RunningBroker;
  let workspace: Workspace;
  const vehicles = new Map<string, TestVehicle>();
  let aggregator: Aggregator | undefined;

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace();
  });

  after(async () => {
    await aggregator?.stop();
    await Promise.all([...vehicles.values()].map((vehicle) => vehicle.close()));
    await broker.close();
    workspace.remove();
  });

  test('each bad input acked, round continues', async () => {
    const online = [
      'good-a',
      'good-b',
      'v-trunc',
      'v-version',
      'v-round',
      'v-shape',
      'v-nan',
      'v-zero',
      'v-tensors',
      'v-encoding',
      'v-many',
      'v-huge',
    ];
    for (const id of online)
      vehicles.set(id, await TestVehicle.connect(broker, id));
    vehicles.set(
      'v-outsider',
      await TestVehicle.connect(broker, 'v-outsider', false),
    );
    const v = (id: string): TestVehicle => vehicles.get(id)!;
    aggregator = new Aggregator(
      testOptions(broker, workspace, images, {
        minVehiclesOnline: online.length,
        minUpdates: 2,
      }),
    );
    const closed = once(aggregator, 'round-closed');
    await aggregator.start();
    const task = await v('good-a').nextTask();
    const valid = (id: string) => buildUpdate(id, task);
    const names = task.training.trainableTensors;

    assertAccepted(await v('good-a').send(encodeModelUpdate(valid('good-a'))));
    assertRejected(
      await v('good-a').send(encodeModelUpdate(valid('good-a'))),
      ErrorCode.DuplicateUpdate,
    );
    const retry = { ...valid('good-a'), updateId: 'good-a-second' };
    assertRejected(
      await v('good-a').send(encodeModelUpdate(retry)),
      ErrorCode.DuplicateUpdate,
    );

    const bytes = encodeModelUpdate(valid('v-trunc'));
    const truncated = await v('v-trunc').send(
      bytes.subarray(0, bytes.length - 1000),
    );
    assertRejected(truncated, ErrorCode.MalformedPayload);
    assert.equal(truncated.currentRound, 1);
    assert.equal(truncated.currentModelVersion, 0);

    const wrongVersion = { ...valid('v-version'), baseModelVersion: 7 };
    assertRejected(
      await v('v-version').send(encodeModelUpdate(wrongVersion)),
      ErrorCode.WrongModelVersion,
    );

    const wrongRound = await v('v-round').send(
      encodeModelUpdate({ ...valid('v-round'), round: 9 }),
    );
    assertRejected(wrongRound, ErrorCode.WrongRound);
    assert.match(wrongRound.reason, /current round is 1, model version 0/);

    const shapes = valid('v-shape');
    shapes.deltas[3] = encodeFloat32Tensor(
      'dense2/bias',
      [42],
      new Float32Array(42),
    );
    assertRejected(
      await v('v-shape').send(encodeModelUpdate(shapes)),
      ErrorCode.WrongShape,
    );

    const nan = buildUpdate('v-nan', task, {
      value: (name, i) => (i === 5 ? Number.NaN : 0),
    });
    assertRejected(
      await v('v-nan').send(encodeModelUpdate(nan)),
      ErrorCode.NonFiniteValue,
    );

    const zero = buildUpdate('v-zero', task, { numExamples: 0 });
    assertRejected(
      await v('v-zero').send(encodeModelUpdate(zero)),
      ErrorCode.InvalidExampleCount,
    );

    const many = await v('v-many').send(
      encodeModelUpdate(
        buildUpdate('v-many', task, { numExamples: Number.MAX_SAFE_INTEGER }),
      ),
    );
    assertRejected(many, ErrorCode.InvalidExampleCount);
    assert.match(many.reason, /9007199254740991/);
    assert.match(many.reason, /maximum of 1000000/);

    const huge = await v('v-huge').send(
      encodeModelUpdate(buildUpdate('v-huge', task, { value: () => 3e38 })),
    );
    assertRejected(huge, ErrorCode.ValueOutOfRange);
    assert.match(huge.reason, /expected \|value\| <= 1000/);

    const partial = {
      ...valid('v-tensors'),
      deltas: buildDeltas(names.slice(2), () => 0),
    };
    assertRejected(
      await v('v-tensors').send(encodeModelUpdate(partial)),
      ErrorCode.WrongTensors,
    );

    const half = valid('v-encoding');
    half.deltas[1] = { ...half.deltas[1], encoding: TensorEncoding.Float16 };
    assertRejected(
      await v('v-encoding').send(encodeModelUpdate(half)),
      ErrorCode.UnsupportedEncoding,
    );

    const outsider = await v('v-outsider').send(
      encodeModelUpdate(valid('v-outsider')),
    );
    assertRejected(outsider, ErrorCode.VehicleNotSelected);
    const spoofed = await v('v-outsider').send(
      encodeModelUpdate(valid('good-b')),
    );
    assertRejected(spoofed, ErrorCode.MalformedPayload);

    // A rejected update does not count as the vehicle's response. Every
    // selected vehicle has sent one, yet the round stays open, and each
    // may still send a valid update, even under its rejected update id.
    assert.equal(aggregator.roundsCompleted, 0);
    const retrying = online.filter((id) => id !== 'good-a');
    for (const id of retrying) {
      assertAccepted(await v(id).send(encodeModelUpdate(valid(id))));
    }

    const [event] = (await closed) as [RoundClosedEvent];
    assert.equal(event.accepted, online.length);
    assert.equal(event.rejected, 14);
    assert.ok(event.durationMs < 10_000, 'round waited for its deadline');
    assert.deepEqual(event.rejectedByReason, {
      [ErrorCode.DuplicateUpdate]: 2,
      [ErrorCode.MalformedPayload]: 2,
      [ErrorCode.WrongModelVersion]: 1,
      [ErrorCode.WrongRound]: 1,
      [ErrorCode.WrongShape]: 1,
      [ErrorCode.NonFiniteValue]: 1,
      [ErrorCode.InvalidExampleCount]: 2,
      [ErrorCode.ValueOutOfRange]: 1,
      [ErrorCode.WrongTensors]: 1,
      [ErrorCode.UnsupportedEncoding]: 1,
      [ErrorCode.VehicleNotSelected]: 1,
    });
    assert.equal(event.modelVersion, 1);

    const late = await v('good-b').send(
      encodeModelUpdate({ ...valid('good-b'), updateId: 'late' }),
    );
    assertRejected(late, ErrorCode.RoundClosed);
    assert.equal(late.currentModelVersion, 1);
  });
});

describe('aggregator spoofed update', () => {
  let broker: RunningBroker;
  let workspace: Workspace;
  let vehicles: TestVehicle[] = [];
  let aggregator: Aggregator | undefined;

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace();
  });

  after(async () => {
    await aggregator?.stop();
    await Promise.all(vehicles.map((vehicle) => vehicle.close()));
    await broker.close();
    workspace.remove();
  });

  test('rejected update keeps round open', async () => {
    vehicles = await Promise.all(
      ['s-1', 'attacker'].map((id) =>
        TestVehicle.connect(broker, id, id === 's-1'),
      ),
    );
    const [real, attacker] = vehicles;
    aggregator = new Aggregator(
      testOptions(broker, workspace, images, { minUpdates: 1 }),
    );
    const closed = once(aggregator, 'round-closed');
    await aggregator.start();
    const task = await real.nextTask();

    // Any client can publish on a vehicle's topic, because the broker has
    // no access control. The spoofed update is rejected and acked to s-1.
    const spoofed = buildUpdate('s-1', task, {
      value: (_name, i) => (i === 0 ? Number.NaN : 0),
    });
    const spoofAck = real.nextAck();
    await attacker.client.publishAsync(
      topics.update('s-1'),
      Buffer.from(encodeModelUpdate(spoofed)),
      { qos: 1 },
    );
    assertRejected(await spoofAck, ErrorCode.NonFiniteValue);
    assert.equal(aggregator.roundsCompleted, 0);

    assertAccepted(
      await real.send(encodeModelUpdate(buildUpdate('s-1', task))),
    );
    const [event] = (await closed) as [RoundClosedEvent];
    assert.equal(event.accepted, 1);
    assert.equal(event.rejected, 1);
    assert.equal(event.modelVersion, 1);
    assert.ok(event.durationMs < 10_000, 'round waited for its deadline');

    const again = await real.send(
      encodeModelUpdate({ ...buildUpdate('s-1', task), updateId: 'again' }),
    );
    assertRejected(again, ErrorCode.RoundClosed);
  });
});
