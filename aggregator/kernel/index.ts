export { aggregationKernelName, createExactSums } from './exact-sums.ts';
export type { ExactSums, ExactSumsKernel } from './exact-sums.ts';
export { nativeLimbAddon } from './native-sums.ts';
