import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  FAULT_KINDS,
  FaultPlan,
  LINK_FAULT_KINDS,
  PAYLOAD_FAULT_KINDS,
  parseFaultList,
  type FaultKind,
} from '../scripts/sim/faults.ts';

const VEHICLES = Array.from(
  { length: 12 },
  (_, i) => `veh-${String(i + 1).padStart(3, '0')}`,
);

function plan(
  overrides: Partial<ConstructorParameters<typeof FaultPlan>[0]> = {},
) {
  return new FaultPlan({
    kinds: FAULT_KINDS,
    rate: 0.25,
    seed: 2,
    rounds: 8,
    ...overrides,
  });
}

/** Plans `rounds` rounds of `vehicles` and returns the plans in a form assert can compare. */
function planRounds(faultPlan: FaultPlan, rounds: number, vehicles = VEHICLES) {
  const plans = [];
  for (let round = 1; round <= rounds; round++) {
    const roundPlan = faultPlan.planRound(round, vehicles);
    plans.push({
      link: [...roundPlan.linkFaults.entries()],
      payload: [...roundPlan.payloadFaults.entries()],
    });
  }
  return plans;
}

describe('parseFaultList', () => {
  test('all selects every kind', () => {
    assert.deepEqual(parseFaultList('all'), [...FAULT_KINDS]);
  });

  test('list keeps report order', () => {
    const kinds = parseFaultList(' nan, kill-agent ,nan,reorder');

    assert.deepEqual(kinds, ['kill-agent', 'reorder', 'nan']);
  });

  test('unknown kind throws RangeError', () => {
    assert.throws(
      () => parseFaultList('kill-agent,meteor'),
      (err: unknown) => {
        assert.ok(err instanceof RangeError);
        assert.match(err.message, /meteor/);
        assert.match(err.message, /delay-deadline/);
        return true;
      },
    );
  });

  test('empty list throws RangeError', () => {
    assert.throws(() => parseFaultList(' , '), RangeError);
  });
});

describe('FaultPlan', () => {
  test('rejects rates outside (0, 1]', () => {
    for (const rate of [0, -0.1, 1.5, Number.NaN]) {
      assert.throws(() => plan({ rate }), RangeError, `rate ${rate}`);
    }
  });

  test('rejects an empty kind list', () => {
    assert.throws(() => plan({ kinds: [] }), RangeError);
  });

  test('same seed gives same plans', () => {
    const first = planRounds(plan(), 8);
    const second = planRounds(plan(), 8);

    assert.deepEqual(first, second);
  });

  test('another seed gives other plans', () => {
    const first = planRounds(plan({ seed: 2 }), 8);
    const second = planRounds(plan({ seed: 3 }), 8);

    assert.notDeepEqual(first, second);
  });

  test('victims scale with the rate', () => {
    const faultPlan = plan({ rate: 0.25 });

    assert.equal(faultPlan.victimsPerKind(12), 3);
    assert.equal(faultPlan.victimsPerKind(6), 2);
    assert.equal(faultPlan.victimsPerKind(1), 1);
    assert.equal(faultPlan.victimsPerKind(0), 0);
  });

  test('one link fault per vehicle', () => {
    const faultPlan = plan({ rate: 1 });

    for (let round = 1; round <= 5; round++) {
      const roundPlan = faultPlan.planRound(round, VEHICLES);

      // A Map holds one fault per vehicle by construction, so check
      // that every selected vehicle got one and no other vehicle did.
      assert.equal(roundPlan.linkFaults.size, VEHICLES.length);
      for (const vehicleId of roundPlan.linkFaults.keys()) {
        assert.ok(VEHICLES.includes(vehicleId), vehicleId);
      }
    }
  });

  test('every link kind comes up', () => {
    const faultPlan = plan({ rate: 0.25 });
    const seen = new Set<string>();

    for (let round = 1; round <= 3; round++) {
      const roundPlan = faultPlan.planRound(round, VEHICLES.slice(0, 6));
      for (const fault of roundPlan.linkFaults.values()) seen.add(fault.kind);
    }

    assert.deepEqual([...seen].sort(), [...LINK_FAULT_KINDS].sort());
  });

  test('payload kinds hit their share', () => {
    const roundPlan = plan({ rate: 0.25 }).planRound(1, VEHICLES);
    const perKind = new Map<string, number>();

    for (const faults of roundPlan.payloadFaults.values()) {
      for (const fault of faults) {
        perKind.set(fault.kind, (perKind.get(fault.kind) ?? 0) + 1);
      }
    }

    for (const kind of PAYLOAD_FAULT_KINDS) {
      assert.equal(perKind.get(kind), 3, kind);
    }
  });

  test('only enabled kinds are planned', () => {
    const kinds: FaultKind[] = ['reorder', 'nan'];
    const faultPlan = plan({ kinds });

    const roundPlan = faultPlan.planRound(1, VEHICLES);

    for (const fault of roundPlan.linkFaults.values()) {
      assert.equal(fault.kind, 'reorder');
    }
    for (const faults of roundPlan.payloadFaults.values()) {
      for (const fault of faults) assert.equal(fault.kind, 'nan');
    }
    assert.equal(faultPlan.restartRound, undefined);
  });

  test('kill moments and duplicate methods alternate', () => {
    const faultPlan = plan({ kinds: ['kill-agent', 'duplicate'], rate: 0.25 });
    const moments = new Set<string>();
    const methods = new Set<string>();

    const roundPlan = faultPlan.planRound(1, VEHICLES);
    for (const fault of roundPlan.linkFaults.values()) {
      if (fault.kind === 'kill-agent') moments.add(fault.moment);
      if (fault.kind === 'duplicate') methods.add(fault.method);
    }

    assert.deepEqual([...moments].sort(), ['after-publish', 'mid-training']);
    assert.deepEqual([...methods].sort(), ['drop-puback', 'publish-twice']);
  });

  test('restart lands inside the run', () => {
    for (let seed = 0; seed < 20; seed++) {
      const restartRound = plan({ seed, rounds: 8 }).restartRound;

      assert.ok(restartRound !== undefined);
      assert.ok(restartRound >= 2, `seed ${seed}`);
      assert.ok(restartRound <= 7, `seed ${seed}`);
    }
    assert.equal(plan({ rounds: 1 }).restartRound, 1);
  });

  test('restart threshold cuts the round', () => {
    const faultPlan = plan();

    assert.equal(faultPlan.restartThreshold(12), 6);
    assert.equal(faultPlan.restartThreshold(3), 1);
    assert.equal(faultPlan.restartThreshold(1), undefined);
  });
});
