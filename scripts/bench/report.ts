/** The benchmark's results: one table on stdout, the same data as JSON. */
import Table from 'cli-table3';
import type { CodecResult } from './codec.ts';
import type { FleetRoundResult } from './fleet-round.ts';
import type { InferenceResult } from './inference.ts';
import type { KernelResult } from './kernel.ts';
import type { MachineFacts } from './machine.ts';
import type { NumpyResult } from './numpy.ts';

export interface BenchReport {
  command: string;
  startedAt: string;
  machine: MachineFacts;
  kernel?: KernelResult;
  /** The numpy timings, or why they were skipped. */
  numpy?: NumpyResult | string;
  codec?: CodecResult;
  inference?: InferenceResult;
  fleetRound?: FleetRoundResult;
  /** Message of each part that failed, by part name. */
  errors: Record<string, string>;
}

const seconds = (value: number) => `${value.toFixed(4)} s`;
const ratio = (value: number) => `${value.toFixed(2)}x`;
const megabytes = (bytes: number) => `${(bytes / 1e6).toFixed(2)} MB`;

function kernelRows(kernel: KernelResult, numpy: BenchReport['numpy']) {
  const label = `${kernel.updates} x ${kernel.size.toLocaleString('en')}`;
  const fedavg = kernel.add.best + kernel.result.best;
  const rows: string[][] = [
    [
      `copy (TypedArray.set), ${label} float32`,
      seconds(kernel.copy.best),
      `${kernel.copyGBps.toFixed(2)} GB/s`,
    ],
    [
      `kernel add (${kernel.kernel}), checks included`,
      seconds(kernel.add.best),
      `${kernel.addGBps.toFixed(2)} GB/s = ${(kernel.addToCopyRatio * 100).toFixed(1)}% of copy`,
    ],
  ];
  if (kernel.wasmAdd !== undefined) {
    rows.push([
      'kernel add (wasm-simd), checks included',
      seconds(kernel.wasmAdd.best),
      `${kernel.wasmAddGBps!.toFixed(2)} GB/s; ${kernel.kernel} ${ratio(kernel.wasmAdd.best / kernel.add.best)} faster`,
    ]);
  }
  rows.push(
    [
      'kernel add (js loop)',
      seconds(kernel.jsAdd.best),
      `${kernel.jsAddGBps.toFixed(2)} GB/s; ${kernel.kernel} ${ratio(kernel.jsAdd.best / kernel.add.best)} faster`,
    ],
    ['FedAvg result (divide, to float32)', seconds(kernel.result.best), ''],
  );
  if (typeof numpy === 'object') {
    rows.push([
      `numpy ${numpy.numpyVersion} Flower-style FedAvg, ${label}`,
      seconds(numpy.secondsBest),
      `kernel add + result ${ratio(numpy.secondsBest / fedavg)} faster`,
    ]);
  } else if (typeof numpy === 'string') {
    rows.push(['numpy Flower-style FedAvg', numpy, '']);
  }
  return rows;
}

function codecRows(codec: CodecResult) {
  const size = megabytes(codec.updateBytes);
  return [
    [
      `protobuf encode, update of ${size}`,
      `${codec.encodeMicroseconds.toFixed(0)} µs`,
      `${(codec.updateBytes / codec.encodeMicroseconds / 1e3).toFixed(2)} GB/s`,
    ],
    [
      'protobuf decode, message at offset 0',
      `${codec.decodeMicroseconds.toFixed(0)} µs`,
      `${codec.tensorsViewedInPlace}/${codec.tensors} tensors viewed in place`,
    ],
    [
      'protobuf decode, message at offset 1',
      `${codec.decodeUnalignedMicroseconds.toFixed(0)} µs`,
      `${codec.tensorsViewedInPlaceUnaligned}/${codec.tensors} tensors viewed in place`,
    ],
  ];
}

function inferenceRows(inference: InferenceResult) {
  return [
    [
      `onnxruntime-node, ${inference.images} test images`,
      seconds(inference.onnxSeconds),
      `${inference.onnxImagesPerSecond.toFixed(0)} images/s; ` +
        `${ratio(inference.onnxSpeedup)} TF.js`,
    ],
    [
      `TF.js ${inference.tfjsBackend}, same model and images`,
      seconds(inference.tfjsSeconds),
      `${inference.tfjsImagesPerSecond.toFixed(0)} images/s; top-1 ` +
        `agreement ${inference.top1Agreement.toFixed(4)}, max |dp| ` +
        inference.maxAbsProbabilityDifference.toExponential(1),
    ],
  ];
}

function fleetRows(round: FleetRoundResult) {
  return [
    [
      `round with ${round.vehicles} vehicles (${round.accepted} accepted)`,
      seconds(round.roundSeconds),
      `whole run ${round.runSeconds.toFixed(1)} s, training on ${round.trainingBackend}`,
    ],
    [
      'bytes on the wire per round',
      `${megabytes(round.uplinkBytes)} up`,
      `${megabytes(round.downlinkBytes)} down; ` +
        `${megabytes(round.uplinkBytesPerVehicle)} per update`,
    ],
  ];
}

/** Prints the machine, the command and one table of every figure. */
export function printReport(report: BenchReport): void {
  const { machine } = report;
  console.log(
    `machine: ${machine.cpuModel}, ${machine.cores} cores, ` +
      `${machine.memoryGiB} GiB, ${machine.platform}; Node ${machine.node} ` +
      `(V8 ${machine.v8}), TF.js ${machine.tfjs}, onnxruntime-node ` +
      `${machine.onnxruntimeNode}; load average ${machine.loadAverage}`,
  );
  console.log(`command: ${report.command}`);
  const table = new Table({
    head: ['measure', 'time', 'rate and ratio'],
    style: { head: [], border: [] },
  });
  if (report.kernel) table.push(...kernelRows(report.kernel, report.numpy));
  if (report.codec) table.push(...codecRows(report.codec));
  if (report.inference) table.push(...inferenceRows(report.inference));
  if (report.fleetRound) table.push(...fleetRows(report.fleetRound));
  for (const [name, message] of Object.entries(report.errors)) {
    table.push([`${name} failed`, message, '']);
  }
  console.log(table.toString());
}
