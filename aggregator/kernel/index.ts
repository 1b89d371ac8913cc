export { createExactSums } from './exact-sums.ts';
export type { ExactSums, ExactSumsKernel } from './exact-sums.ts';
export { aggregationKernelName, nativeLimbAddon } from './native-sums.ts';
