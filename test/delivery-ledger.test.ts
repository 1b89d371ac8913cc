import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { UpdateDecidedEvent } from '../aggregator/index.ts';
import { DeliveryLedger, formatDeliveryLine } from '../scripts/sim/ledger.ts';

function decision(
  overrides: Partial<UpdateDecidedEvent> = {},
): UpdateDecidedEvent {
  return {
    vehicleId: 'veh-001',
    round: 1,
    updateId: 'u-1',
    accepted: true,
    reasonCode: undefined,
    bytes: 100,
    ...overrides,
  };
}

function rejection(
  reasonCode: string,
  overrides: Partial<UpdateDecidedEvent> = {},
): UpdateDecidedEvent {
  return decision({ accepted: false, reasonCode, ...overrides });
}

describe('DeliveryLedger', () => {
  test('accepted once with a duplicate', () => {
    const ledger = new DeliveryLedger();
    ledger.noteFinished('u-1', 'veh-001', 1, 'sent');
    ledger.noteFinished('u-1', 'veh-001', 1, 'resent');

    ledger.noteDecision(decision());
    ledger.noteDecision(rejection('DUPLICATE_UPDATE'));
    const summary = ledger.summarize(new Set());

    assert.equal(summary.finishedUpdates, 1);
    assert.equal(summary.acceptedOnce, 1);
    assert.equal(summary.repeatDecisions, 1);
    assert.equal(summary.lost, 0);
    assert.equal(summary.doubleCounted, 0);
  });

  test('rejections counted by first reason', () => {
    const ledger = new DeliveryLedger();
    ledger.noteFinished('u-1', 'veh-001', 1, 'sent');
    ledger.noteFinished('u-2', 'veh-002', 1, 'sent');

    ledger.noteDecision(rejection('ROUND_CLOSED'));
    ledger.noteDecision(rejection('WRONG_ROUND'));
    ledger.noteDecision(
      rejection('DUPLICATE_UPDATE', { updateId: 'u-2', vehicleId: 'veh-002' }),
    );
    const summary = ledger.summarize(new Set());

    assert.equal(summary.rejectedWithReason, 2);
    assert.deepEqual(summary.rejectedByReason, {
      ROUND_CLOSED: 1,
      DUPLICATE_UPDATE: 1,
    });
  });

  test('undecided update is lost', () => {
    const ledger = new DeliveryLedger();
    ledger.noteFinished('u-1', 'veh-001', 1, 'sent');
    ledger.noteFinished('u-2', 'veh-001', 2, 'outbox');

    const summary = ledger.summarize(new Set(['u-2']));

    assert.equal(summary.lost, 2);
    assert.equal(summary.lostPending, 1);
    assert.equal(summary.pendingAtEnd, 1);
    assert.deepEqual(summary.lostUpdateIds.sort(), ['u-1', 'u-2']);
  });

  test('id accepted twice is double counted', () => {
    const ledger = new DeliveryLedger();
    ledger.noteFinished('u-1', 'veh-001', 1, 'sent');

    ledger.noteDecision(decision());
    ledger.noteDecision(decision());
    const summary = ledger.summarize(new Set());

    assert.equal(summary.doubleCounted, 1);
    assert.deepEqual(summary.doubleCountedIds, ['u-1']);
    assert.equal(summary.acceptedOnce, 0);
  });

  test('two ids for one vehicle round', () => {
    const ledger = new DeliveryLedger();
    ledger.noteFinished('u-1', 'veh-001', 3, 'sent');
    ledger.noteFinished('u-2', 'veh-001', 3, 'resent');

    ledger.noteDecision(decision({ round: 3 }));
    ledger.noteDecision(decision({ round: 3, updateId: 'u-2' }));
    const summary = ledger.summarize(new Set());

    assert.equal(summary.acceptedOnce, 2);
    assert.equal(summary.doubleCounted, 1);
    assert.deepEqual(summary.doubleCountedIds, ['veh-001@3']);
  });

  test('interrupted round acceptances reported', () => {
    const ledger = new DeliveryLedger();
    ledger.noteFinished('u-1', 'veh-001', 2, 'sent');
    ledger.noteInterruptedRound(2);

    ledger.noteDecision(decision({ round: 2 }));
    const summary = ledger.summarize(new Set());

    assert.equal(summary.acceptedInInterruptedRounds, 1);
    assert.deepEqual(summary.interruptedRounds, [2]);
  });

  test('injected payloads matched to decisions', () => {
    const ledger = new DeliveryLedger();
    ledger.noteInjected({
      kind: 'truncated',
      vehicleId: 'veh-001',
      updateId: undefined,
      expectedCode: 'MALFORMED_PAYLOAD',
    });
    ledger.noteInjected({
      kind: 'nan',
      vehicleId: 'veh-001',
      updateId: 'injected-nan-1',
      expectedCode: 'NON_FINITE_VALUE',
    });
    ledger.noteInjected({
      kind: 'wrong-shape',
      vehicleId: 'veh-002',
      updateId: 'injected-wrong-shape-1',
      expectedCode: 'WRONG_SHAPE',
    });

    ledger.noteDecision(
      rejection('MALFORMED_PAYLOAD', { updateId: undefined, round: undefined }),
    );
    ledger.noteDecision(
      rejection('DUPLICATE_UPDATE', { updateId: 'injected-nan-1' }),
    );
    const summary = ledger.summarize(new Set());

    assert.equal(summary.injectedPayloads, 3);
    assert.equal(summary.injectedRejected, 2);
    assert.equal(summary.injectedUndecided, 1);
    assert.equal(summary.injectedAccepted, 0);
    assert.equal(summary.injectedUnexpectedCode, 1);
    assert.deepEqual(summary.injectedByKind, {
      truncated: { MALFORMED_PAYLOAD: 1 },
      nan: { DUPLICATE_UPDATE: 1 },
      'wrong-shape': { UNDECIDED: 1 },
    });
    assert.equal(summary.finishedUpdates, 0);
  });

  test('unknown ids are unattributed', () => {
    const ledger = new DeliveryLedger();

    ledger.noteDecision(decision({ updateId: 'stranger' }));
    ledger.noteDecision(
      rejection('MALFORMED_PAYLOAD', { updateId: undefined, round: undefined }),
    );
    const summary = ledger.summarize(new Set());

    assert.equal(summary.unattributedDecisions, 2);
  });

  test('silent selected vehicles listed', () => {
    const ledger = new DeliveryLedger();
    ledger.noteRoundOpened(1, ['veh-001', 'veh-002']);
    ledger.noteRoundOpened(2, ['veh-001', 'veh-002']);
    ledger.noteInterruptedRound(2);
    ledger.noteFinished('u-1', 'veh-001', 1, 'sent');

    const summary = ledger.summarize(new Set());

    assert.deepEqual(summary.silentVehicleRounds, ['veh-002@1']);
  });

  test('summary line names the counts', () => {
    const ledger = new DeliveryLedger();
    ledger.noteFinished('u-1', 'veh-001', 1, 'sent');
    ledger.noteDecision(rejection('ROUND_CLOSED'));

    const line = formatDeliveryLine(ledger.summarize(new Set()));

    assert.match(line, /1 finished updates/);
    assert.match(line, /ROUND_CLOSED 1/);
    assert.match(line, /lost 0, double counted 0/);
  });
});
