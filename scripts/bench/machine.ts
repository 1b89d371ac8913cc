/** Facts about the machine and runtime a benchmark ran on. */
import { readFileSync } from 'node:fs';
import os from 'node:os';
import { fileURLToPath } from 'node:url';

export interface MachineFacts {
  cpuModel: string;
  cores: number;
  memoryGiB: number;
  platform: string;
  node: string;
  v8: string;
  tfjs: string;
  onnxruntimeNode: string;
  /**
   * 1-minute load average at start. Above 0, other work shared the CPU.
   */
  loadAverage: number;
}

/** Version of an installed dependency, read from its package.json. */
function packageVersion(name: string): string {
  const file = fileURLToPath(
    new URL(`../../node_modules/${name}/package.json`, import.meta.url),
  );
  return (JSON.parse(readFileSync(file, 'utf8')) as { version: string })
    .version;
}

export function machineFacts(): MachineFacts {
  const cpus = os.cpus();
  return {
    cpuModel: cpus[0]?.model.trim() ?? 'unknown',
    cores: cpus.length,
    memoryGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    platform: `${os.type()} ${os.release()} ${os.arch()}`,
    node: process.version,
    v8: process.versions.v8,
    tfjs: packageVersion('@tensorflow/tfjs'),
    onnxruntimeNode: packageVersion('onnxruntime-node'),
    loadAverage: Math.round(os.loadavg()[0] * 100) / 100,
  };
}
