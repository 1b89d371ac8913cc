/**
 * Run by test/aggregation-kernel-native.test.ts in a child process with
 * LIMBS_INSTRUCTION_SET set, because the addon picks its instruction set
 * once per process. Prints the native kernel's instruction set and
 * whether its single and batched sums give the reference's bytes.
 */
import {
  createExactSums,
  nativeLimbAddon,
} from '../../aggregator/kernel/index.ts';
import { MAX_ABS_WEIGHTED_DELTA } from '../../aggregator/fedavg.ts';
import { bytesOf, plan, referenceMean } from '../kernel-fixtures.ts';

const updates = plan(31, 10_007, 19);
const expected = bytesOf(referenceMean(updates));
const total = updates.reduce((sum, update) => sum + update.numExamples, 0);

const single = createExactSums([10_007], 'native');
for (const { values, numExamples } of updates) {
  single.add(0, values, numExamples, MAX_ABS_WEIGHTED_DELTA / numExamples);
}

const batched = createExactSums([10_007], 'native');
const examples = Float64Array.from(updates, (update) => update.numExamples);
const failure = batched.addBatch(
  0,
  updates.map((update) => update.values),
  examples,
  examples.map((n) => MAX_ABS_WEIGHTED_DELTA / n),
);

process.stdout.write(
  JSON.stringify({
    instructionSet: nativeLimbAddon().reason,
    singleEqual: bytesOf(single.divide(0, total)).equals(expected),
    batchedEqual:
      failure === -1 && bytesOf(batched.divide(0, total)).equals(expected),
  }),
);
