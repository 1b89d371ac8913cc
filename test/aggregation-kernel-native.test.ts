import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import {
  FedAvgAccumulator,
  MAX_ABS_WEIGHTED_DELTA,
} from '../aggregator/fedavg.ts';
import {
  createExactSums,
  nativeLimbAddon,
  type ExactSumsKernel,
} from '../aggregator/kernel/index.ts';
import { createRandom } from '../models/index.ts';
import {
  bytesOf,
  plan,
  randomUpdate,
  referenceMean,
} from './kernel-fixtures.ts';

const CHILD = fileURLToPath(
  new URL('./support/kernel-identity-child.ts', import.meta.url),
);

/** CPU flags from /proc/cpuinfo, empty where it does not exist. */
function cpuFlags(): Set<string> {
  try {
    const info = readFileSync('/proc/cpuinfo', 'utf8');
    const line = /^flags\s*:(.*)$/m.exec(info);
    return new Set(line === null ? [] : line[1].trim().split(/\s+/));
  } catch {
    return new Set();
  }
}

const flags = cpuFlags();
const native = nativeLimbAddon();
const KERNELS: ExactSumsKernel[] =
  native.addon === null ? ['wasm-simd', 'js'] : ['native', 'wasm-simd', 'js'];
const SIZES = new Map([
  ['a', 20_000],
  ['b', 40_001],
]);

function deltasOf(seed: number, numExamples: number) {
  const random = createRandom(seed);
  return new Map(
    [...SIZES].map(([name, size]) => [
      name,
      randomUpdate(size, numExamples, random),
    ]),
  );
}

function limitsOf(examples: Float64Array): Float64Array {
  return examples.map((n) => MAX_ABS_WEIGHTED_DELTA / n);
}

describe('native aggregation kernel', () => {
  test(
    'built on a CPU with AVX2',
    {
      skip:
        process.arch !== 'x64' || !flags.has('avx2')
          ? 'not an x86-64 CPU with AVX2'
          : false,
    },
    () => {
      // `npm ci` builds the addon, but a failed build only warns. This test
      // is what notices it.
      assert.notEqual(native.addon, null, native.reason);
      assert.equal(native.reason, flags.has('avx512f') ? 'avx512f' : 'avx2');
      assert.equal(new FedAvgAccumulator(SIZES).kernel, 'native');
    },
  );

  for (const forced of ['avx2', 'avx512f']) {
    test(
      `${forced} build matches reference`,
      {
        skip:
          native.addon === null || !flags.has(forced)
            ? `no native addon or no ${forced} here`
            : false,
      },
      () => {
        const child = spawnSync(process.execPath, ['--import', 'tsx', CHILD], {
          encoding: 'utf8',
          env: { ...process.env, LIMBS_INSTRUCTION_SET: forced },
          timeout: 60_000,
        });
        assert.equal(child.status, 0, child.stderr);
        assert.deepEqual(JSON.parse(child.stdout), {
          instructionSet: forced,
          singleEqual: true,
          batchedEqual: true,
        });
      },
    );
  }

  for (const kernel of KERNELS) {
    test(`${kernel} batched add matches reference`, () => {
      const updates = plan(41, 16_391, 21);
      const sums = createExactSums([16_391], kernel);
      let total = 0;
      for (let start = 0; start < updates.length; start += 8) {
        const batch = updates.slice(start, start + 8);
        const examples = Float64Array.from(batch, (u) => u.numExamples);
        const failure = sums.addBatch(
          0,
          batch.map((u) => u.values),
          examples,
          limitsOf(examples),
        );
        assert.equal(failure, -1);
        total += examples.reduce((sum, n) => sum + n, 0);
      }

      const expected = bytesOf(referenceMean(updates));
      assert.ok(bytesOf(sums.divide(0, total)).equals(expected));
    });

    test(`${kernel} batched add locates bad value`, () => {
      const updates = plan(42, 1_001, 8);
      updates[5].values[700] = Number.NaN;
      updates[3].values[900] = Number.POSITIVE_INFINITY;
      updates[3].values[950] = Number.NaN;
      const sums = createExactSums([1_001], kernel);
      const [first] = updates;
      sums.add(0, first.values, first.numExamples, Infinity);
      const before = bytesOf(sums.divide(0, 1));
      const examples = Float64Array.from(updates, (u) => u.numExamples);

      const failure = sums.addBatch(
        0,
        updates.map((u) => u.values),
        examples,
        limitsOf(examples),
      );

      assert.deepEqual(failure, [3, 900]);
      assert.ok(bytesOf(sums.divide(0, 1)).equals(before));
    });
  }
});

describe('FedAvgAccumulator.queue', () => {
  test('matches add byte for byte', () => {
    const updates = Array.from({ length: 21 }, (_, k) => ({
      deltas: deltasOf(100 + k, 1 + k * 37),
      numExamples: 1 + k * 37,
    }));
    const added = new FedAvgAccumulator(SIZES);
    const queued = new FedAvgAccumulator(SIZES);

    for (const { deltas, numExamples } of updates) {
      added.add(deltas, numExamples);
      queued.queue(deltas, numExamples);
    }

    assert.equal(queued.count, 21);
    assert.equal(queued.totalExamples, added.totalExamples);
    const expected = added.result();
    const actual = queued.result();
    for (const name of SIZES.keys()) {
      assert.ok(
        bytesOf(actual.get(name)!).equals(bytesOf(expected.get(name)!)),
        name,
      );
    }
  });

  test(
    'bad queued value fails result',
    { skip: native.addon === null ? 'no batching kernel here' : false },
    () => {
      const accumulator = new FedAvgAccumulator(SIZES);
      const bad = deltasOf(200, 10);
      bad.get('b')![12_345] = Number.NaN;

      for (let k = 0; k < 5; k++) accumulator.queue(deltasOf(201 + k, 10), 10);
      accumulator.queue(bad, 10);
      accumulator.queue(deltasOf(210, 10), 10);

      // The batch kernel reports the bad value only once the batch is summed.
      assert.throws(
        () => accumulator.result(),
        (err: unknown) =>
          err instanceof RangeError &&
          err.message.includes('tensor b value NaN at index 12345'),
      );
      assert.equal(accumulator.count, 6);
      assert.equal(accumulator.totalExamples, 60);
    },
  );

  test('wrong tensor size rejected at once', () => {
    const accumulator = new FedAvgAccumulator(SIZES);
    const deltas = deltasOf(300, 3);
    deltas.set('a', new Float32Array(7));

    assert.throws(
      () => accumulator.queue(deltas, 3),
      (err: unknown) =>
        err instanceof RangeError &&
        /tensor a has 7 values, expected 20000/.test(err.message),
    );
    assert.equal(accumulator.count, 0);
  });
});
