import assert from 'node:assert/strict';
import { once } from 'node:events';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { describe, test } from 'node:test';
import {
  AckStatus,
  ErrorCode,
  decodeTensorValues,
  encodeModelUpdate,
} from '../protocol/index.ts';
import { CountedUpdates, partialIdOf } from '../aggregator/depot/index.ts';
import { buildUpdate } from './aggregator-fixtures.ts';
import {
  buildTask,
  forwardOneUpdate,
  forwardTwoUpdates,
  recordAcks,
  recordingLogger,
  sleep,
  useDepotTestBed,
  waitUntil,
} from './depot-fixtures.ts';

describe('counted update memory', () => {
  test('forgets oldest beyond capacity', () => {
    const counted = new CountedUpdates(2);

    counted.add(1, ['a', 'b']);
    counted.add(2, ['c']);

    assert.equal(counted.size, 2);
    assert.equal(counted.roundOf('a'), undefined);
    assert.equal(counted.roundOf('b'), 1);
    assert.equal(counted.roundOf('c'), 2);
  });

  test('duplicate ack only for its sender', () => {
    const counted = new CountedUpdates();
    counted.add(3, ['veh-1-r3']);
    const decision = {
      accepted: false as const,
      code: ErrorCode.RoundClosed,
      reason: 'round 3 closed',
      update: buildUpdate('veh-1', buildTask(3, ['veh-1'])),
    };

    const ack = counted.duplicateAck('veh-1', decision, {
      round: 4,
      modelVersion: 3,
    });

    assert.equal(ack?.reasonCode, ErrorCode.DuplicateUpdate);
    assert.equal(ack?.updateId, 'veh-1-r3');
    assert.equal(ack?.currentRound, 4);
    assert.equal(
      counted.duplicateAck('veh-2', decision, { round: 4, modelVersion: 3 }),
      undefined,
    );
  });
});

describe('depot handling of fleet acks', () => {
  const bed = useDepotTestBed();

  test('counted entries acked, rest resent', async () => {
    const task = buildTask(1, ['veh-1', 'veh-2']);
    await bed.fleet.publishTask(task);
    const v1 = await bed.vehicle('veh-1');
    const v2 = await bed.vehicle('veh-2');
    const acks1 = recordAcks(v1);
    const acks2 = recordAcks(v2);
    const { log, lines } = recordingLogger();
    await bed.depot({ log });
    await v1.publish(
      encodeModelUpdate(
        buildUpdate('veh-1', task, { numExamples: 10, value: () => 0.01 }),
      ),
    );
    await v2.publish(
      encodeModelUpdate(
        buildUpdate('veh-2', task, { numExamples: 30, value: () => 0.04 }),
      ),
    );
    const first = await bed.fleet.nthPartial(1);

    await bed.fleet.ack(first, {
      status: AckStatus.Rejected,
      reasonCode: ErrorCode.DuplicateUpdate,
      reason: 'entry of vehicle veh-1: update veh-1-r1 was counted',
      duplicateUpdateIds: ['veh-1-r1'],
    });
    const second = await bed.fleet.nthPartial(2);
    const duplicate = await waitUntil('ack of veh-1', () => acks1[0]);

    assert.equal(second.partialId, partialIdOf('depot-a', 1, ['veh-2-r1']));
    assert.notEqual(second.partialId, first.partialId);
    assert.deepEqual(
      second.updates.map((entry) => [entry.vehicleId, entry.numExamples]),
      [['veh-2', 30]],
    );
    assert.equal(second.numExamples, 30);
    for (const tensor of second.meanDeltas) {
      const values = decodeTensorValues(tensor);
      assert.ok(
        values.every((v) => v === Math.fround(0.04)),
        `${tensor.name} is veh-2's delta alone`,
      );
    }
    assert.equal(duplicate.status, AckStatus.Rejected);
    assert.equal(duplicate.reasonCode, ErrorCode.DuplicateUpdate);
    assert.equal(duplicate.updateId, 'veh-1-r1');
    assert.equal(acks2.length, 0, 'veh-2 waits for the second partial');
    const logged = lines.find(
      (line) => line.msg === 'partial had entries the fleet counted already',
    );
    assert.deepEqual(logged?.duplicateIds, ['veh-1-r1']);
    assert.equal(logged?.partialId, first.partialId);

    await bed.fleet.ack(second);
    const accepted = await waitUntil('ack of veh-2', () => acks2[0]);
    await sleep(300);

    assert.equal(accepted.status, AckStatus.Accepted);
    assert.equal(accepted.updateId, 'veh-2-r1');
    assert.equal(acks1.length, 1, 'one ack for veh-1');
    assert.equal(acks2.length, 1, 'one ack for veh-2');
  });

  test('restart resends the rebuilt partial', async () => {
    const task = buildTask(1, ['veh-1', 'veh-2']);
    await bed.fleet.publishTask(task);
    const v1 = await bed.vehicle('veh-1');
    const v2 = await bed.vehicle('veh-2');
    const first = await bed.depot();
    await v1.publish(encodeModelUpdate(buildUpdate('veh-1', task)));
    await v2.publish(encodeModelUpdate(buildUpdate('veh-2', task)));
    await bed.fleet.ack(await bed.fleet.nthPartial(1), {
      status: AckStatus.Rejected,
      reasonCode: ErrorCode.DuplicateUpdate,
      reason: 'counted',
      duplicateUpdateIds: ['veh-2-r1'],
    });
    const rebuilt = await bed.fleet.nthPartial(2);
    await first.stop();
    const { log, lines } = recordingLogger();

    await bed.depot({ log });
    const resent = await bed.fleet.nthPartial(3);

    assert.equal(resent.partialId, rebuilt.partialId);
    assert.deepEqual(
      resent.updates.map((entry) => entry.vehicleId),
      ['veh-1'],
    );
    const mismatch = lines.find(
      (line) =>
        line.msg ===
        'journal does not hold every update of the forwarded partial',
    );
    assert.equal(mismatch, undefined);
  });

  test('counted entries after close reject rest', async () => {
    const {
      partial,
      acks: [ack1, ack2],
    } = await forwardTwoUpdates(bed);

    // The fleet is on round 2 because round 1 closed meanwhile.
    await bed.fleet.ack(partial, {
      status: AckStatus.Rejected,
      reasonCode: ErrorCode.DuplicateUpdate,
      reason: 'counted',
      duplicateUpdateIds: ['veh-1-r1'],
      currentRound: 2,
      currentModelVersion: 1,
    });
    const [duplicate, closed] = await Promise.all([ack1, ack2]);
    await sleep(300);

    assert.equal(duplicate.reasonCode, ErrorCode.DuplicateUpdate);
    assert.equal(closed.status, AckStatus.Rejected);
    assert.equal(closed.reasonCode, ErrorCode.RoundClosed);
    assert.equal(closed.updateId, 'veh-2-r1');
    assert.equal(closed.currentRound, 2);
    assert.equal(bed.fleet.partials.length, 1, 'no partial after the close');
  });

  test('rejection by partial id stops resends', async () => {
    const { log, lines } = recordingLogger();
    const { partial, acks } = await forwardOneUpdate(bed, {
      partialAckTimeoutMs: 200,
      log,
    });

    await bed.fleet.ack(partial, {
      status: AckStatus.Rejected,
      reasonCode: ErrorCode.WrongModelVersion,
      reason: 'partial is for model version 0, the round is on version 1',
    });
    const ack = await waitUntil('ack of veh-1', () => acks[0]);
    const sent = bed.fleet.partials.length;
    await sleep(1000);

    assert.equal(ack.status, AckStatus.Rejected);
    assert.equal(ack.reasonCode, ErrorCode.WrongModelVersion);
    assert.equal(bed.fleet.partials.length, sent, 'no resend after the ack');
    const logged = lines.find(
      (line) => line.msg === 'partial rejected by the fleet',
    );
    assert.equal(logged?.level, 40, 'logged at warn');
    assert.equal(logged?.code, ErrorCode.WrongModelVersion);
    assert.equal(logged?.partialId, partial.partialId);
    assert.match(String(logged?.reason), /version 1/);
  });

  test('unattributed rejection acks vehicles', async () => {
    const { log, lines } = recordingLogger();
    const { partial, acks } = await forwardOneUpdate(bed, {
      partialAckTimeoutMs: 200,
      log,
    });

    // What the fleet sends when it cannot read the partial id.
    await bed.fleet.ack(partial, {
      updateId: 'unknown',
      round: 0,
      status: AckStatus.Rejected,
      reasonCode: ErrorCode.PayloadTooLarge,
      reason: 'partial is 600000 bytes, above the maximum of 500000 bytes',
    });
    const ack = await waitUntil('ack of veh-1', () => acks[0]);
    const sent = bed.fleet.partials.length;
    await sleep(1000);

    assert.equal(ack.status, AckStatus.Rejected);
    assert.equal(ack.reasonCode, ErrorCode.PayloadTooLarge);
    assert.equal(ack.updateId, 'veh-1-r1');
    assert.equal(bed.fleet.partials.length, sent, 'no resend after the ack');
    const logged = lines.find(
      (line) => line.msg === 'partial rejected by the fleet',
    );
    assert.equal(logged?.partialId, partial.partialId);
    assert.equal(logged?.code, ErrorCode.PayloadTooLarge);
  });

  test('ack queued while down reaches vehicles', async () => {
    const { depot: first, partial, acks } = await forwardOneUpdate(bed);
    await first.stop();

    // The ack is queued in the depot's session while the round closes.
    await bed.fleet.ack(partial, { currentRound: 2, currentModelVersion: 1 });
    await bed.fleet.publishTask(buildTask(2, ['veh-1']));
    const second = await bed.depot();
    const ack = await waitUntil('ack of veh-1', () => acks[0]);
    await sleep(500);

    assert.equal(ack.status, AckStatus.Accepted);
    assert.equal(ack.updateId, 'veh-1-r1');
    assert.equal(acks.length, 1, 'acked once');
    assert.equal(second.options.stateDir, first.options.stateDir);
  });

  test('ack before task is not repeated', async () => {
    const { depot: first, partial, acks } = await forwardOneUpdate(bed);
    await first.stop();

    // The round is still open: the task arrives after the queued ack.
    await bed.fleet.ack(partial);
    const second = await bed.depot();
    await waitUntil('ack of veh-1', () => acks[0]);
    await sleep(500);

    assert.equal(acks.length, 1, 'acked once');
    assert.equal(second.options.stateDir, first.options.stateDir);
  });

  test('resent counted update is duplicate', async () => {
    const task = buildTask(1, ['veh-1']);
    await bed.fleet.publishTask(task);
    const v1 = await bed.vehicle('veh-1');
    const started = await bed.depot();
    const payload = encodeModelUpdate(buildUpdate('veh-1', task));
    const firstAck = v1.nextAck();
    await v1.publish(payload);
    await bed.fleet.ack(await bed.fleet.nthPartial(1));
    assert.equal((await firstAck).status, AckStatus.Accepted);
    const roundStarted = once(started, 'round-started');
    await bed.fleet.publishTask(buildTask(2, ['veh-1']));
    await roundStarted;

    // As an agent does from its outbox after the depot broker restarted.
    const ack = await v1.send(payload);

    assert.equal(ack.status, AckStatus.Rejected);
    assert.equal(ack.reasonCode, ErrorCode.DuplicateUpdate);
    assert.equal(ack.updateId, 'veh-1-r1');
    assert.equal(ack.currentRound, 2);
    assert.match(ack.reason, /already counted/);
  });

  test('unreadable journal file set aside', async () => {
    const task = buildTask(1, ['veh-1']);
    const file = join(bed.stateDir, 'rounds', '1', 'updates', 'garbage.pb');
    mkdirSync(dirname(file), { recursive: true });
    writeFileSync(file, 'not a protobuf message');
    await bed.fleet.publishTask(task);
    const { log, lines } = recordingLogger();

    await bed.depot({ log });
    const logged = await waitUntil('unreadable update logged', () =>
      lines.find((line) => line.msg === 'journaled update unreadable'),
    );

    assert.equal(logged.file, file);
    assert.equal(logged.movedTo, `${file}.bad`);
    assert.equal(logged.level, 50, 'logged at error');
    assert.equal(existsSync(file), false);
    assert.equal(existsSync(`${file}.bad`), true);
  });
});

describe('depot partial above the size limit', () => {
  const bed = useDepotTestBed();

  test('vehicles get the size rejection', async () => {
    const task = buildTask(1, ['veh-1']);
    const updateBytes = encodeModelUpdate(buildUpdate('veh-1', task));
    await bed.fleet.publishTask(task);
    const vehicle = await bed.vehicle('veh-1');
    // The update fits the limit, the partial with its entry list does not.
    await bed.depot({ maxMessageBytes: updateBytes.length });

    const ack = vehicle.nextAck();
    await vehicle.publish(updateBytes);

    const received = await ack;
    assert.equal(received.status, AckStatus.Rejected);
    assert.equal(received.reasonCode, ErrorCode.PayloadTooLarge);
    assert.match(received.reason, /PartialAggregate/);
    assert.equal(bed.fleet.partials.length, 0);
  });
});
