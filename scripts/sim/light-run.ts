/**
 * A scale run: the broker and a heap-capped aggregator as child
 * processes on 127.0.0.1, and N light vehicles in this process, for R
 * rounds. See scripts/simulate-scale.ts for the command line.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import type { Logger } from '../../protocol/index.ts';
import { trainDeltaTemplates, type DeltaTemplate } from './light-deltas.ts';
import { LightFleet } from './light-fleet.ts';
import { ChildNode, type LogRecord } from './light-processes.ts';
import {
  ScaleProgress,
  type ScaleReport,
  type ScaleRoundRow,
} from './light-report.ts';

/** Time the broker and the aggregator have to start. */
const START_TIMEOUT_MS = 120_000;
/** Time a child has to exit after SIGTERM before SIGKILL. */
const CHILD_STOP_TIMEOUT_MS = 10_000;
/** Time one light vehicle has to connect and publish its status. */
const VEHICLE_CONNECT_TIMEOUT_MS = 60_000;
/** Time after a round closes for the vehicles' last acks to arrive. */
const ACK_SETTLE_TIMEOUT_MS = 10_000;
/** Largest update, as the aggregator's default --max-message-bytes. */
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/** Options of {@link runScaleSimulation}. */
export interface ScaleOptions {
  vehicles: number;
  rounds: number;
  seed: number;
  fleetId: string;
  dataDir: string;
  baseWeightsPath: string;
  trainableLayers: string[];
  stateDir: string;
  templates: number;
  templateImages: number;
  publishWindowMs: number;
  maxPendingUpdates: number;
  connectBatch: number;
  connectIntervalMs: number;
  aggregatorHeapMb: number;
  roundTimeoutMs: number;
  reportPath?: string;
  progress: boolean;
  log: Logger;
  /** Aborts the run; every child and vehicle is stopped. */
  signal: AbortSignal;
}

/** The child processes and vehicles of a run, for the cleanup. */
interface RunParts {
  broker?: ChildNode;
  aggregator?: ChildNode;
  fleet?: LightFleet;
}

/**
 * Runs the scale simulation and returns its report, after writing it to
 * `reportPath` when given. Every child process and vehicle is stopped
 * before it returns or throws.
 *
 * @throws {Error} when a child does not start, exits early, or a round
 *   does not end in time; {FleetError} from training the templates.
 */
export async function runScaleSimulation(
  options: ScaleOptions,
): Promise<ScaleReport> {
  const parts: RunParts = {};
  const killAll = (): void => {
    parts.aggregator?.killNow();
    parts.broker?.killNow();
  };
  // A driver that exits without its cleanup leaves no child behind.
  process.once('exit', killAll);
  const progress = new ScaleProgress(options.vehicles, options.progress);
  try {
    return await runParts(options, parts, progress);
  } finally {
    progress.stop();
    await stopParts(parts, options.log);
    process.off('exit', killAll);
  }
}

async function runParts(
  options: ScaleOptions,
  parts: RunParts,
  progress: ScaleProgress,
): Promise<ScaleReport> {
  const started = Date.now();
  const { signal, log } = options;
  const driverPeaks = trackDriverMemory();
  mkdirSync(options.stateDir, { recursive: true });

  parts.broker = new ChildNode({
    name: 'broker',
    script: 'broker/main.ts',
    args: ['--host', '127.0.0.1', '--port', '0', '--log-level', 'info'],
  });
  const brokerStarted = await parts.broker.waitForLog(
    'broker started',
    START_TIMEOUT_MS,
    signal,
  );
  const brokerUrl = `mqtt://127.0.0.1:${Number(brokerStarted.port)}`;
  log.info({ brokerUrl, childPid: parts.broker.pid }, 'broker started');

  parts.aggregator = startAggregator(options, brokerUrl);
  const aggregator = parts.aggregator;
  const roundLines = collectRoundLines(aggregator);
  const templateStarted = Date.now();
  const [templates] = await Promise.all([
    trainTemplates(options),
    aggregator.waitForLog('aggregator started', START_TIMEOUT_MS, signal),
  ]);
  const templateTrainingMs = Date.now() - templateStarted;
  log.info({ childPid: aggregator.pid }, 'aggregator started');

  const fleet = new LightFleet({
    ...options,
    brokerUrl,
    templates,
    ackTimeoutMs: options.roundTimeoutMs,
    maxMessageBytes: MAX_MESSAGE_BYTES,
    connectTimeoutMs: VEHICLE_CONNECT_TIMEOUT_MS,
  });
  parts.fleet = fleet;
  const connectStarted = Date.now();
  await abortable(
    fleet.connect((connected) => progress.show('connecting', connected)),
    signal,
  );
  const connectMs = Date.now() - connectStarted;
  progress.show('connected', fleet.connectedCount, true);

  const rounds: ScaleRoundRow[] = [];
  for (let round = 1; round <= options.rounds; round++) {
    const row = await runRound(
      options,
      aggregator,
      fleet,
      roundLines,
      round,
      progress,
    );
    rounds.push(row);
    log.info(
      { round, accepted: row.accepted, wallTimeMs: row.wallTimeMs },
      'round done',
    );
    if (row.outcome !== 'closed') break;
  }
  // With --max-rounds the aggregator exits by itself after the last round.
  await Promise.race([aggregator.exited, delay(CHILD_STOP_TIMEOUT_MS)]);

  const report: ScaleReport = {
    vehicles: options.vehicles,
    rounds,
    seed: options.seed,
    settings: {
      aggregatorHeapMb: options.aggregatorHeapMb,
      publishWindowMs: options.publishWindowMs,
      maxPendingUpdates: options.maxPendingUpdates,
      connectBatch: options.connectBatch,
      connectIntervalMs: options.connectIntervalMs,
      roundTimeoutMs: options.roundTimeoutMs,
      templates: options.templates,
      templateImages: options.templateImages,
    },
    templateTrainingMs,
    templateExamples: templates.map((template) => template.numExamples),
    connectMs,
    totalMs: 0,
    peakPendingUpdates: fleet.peakPendingUpdates,
    unexpectedAcks: fleet.unexpectedAcks,
    reconnects: fleet.reconnects,
    memory: { aggregator: undefined, broker: undefined, driver: driverPeaks() },
    processes: {
      broker: { pid: parts.broker.pid, exit: undefined },
      aggregator: { pid: aggregator.pid, exit: undefined },
    },
    stateDir: options.stateDir,
  };
  // Stopped here, so that the report contains their final memory lines.
  await stopParts(parts, log);
  report.memory.aggregator = aggregator.memory;
  report.memory.broker = parts.broker.memory;
  report.processes.broker.exit = parts.broker.exit;
  report.processes.aggregator.exit = aggregator.exit;
  report.totalMs = Date.now() - started;
  if (options.reportPath !== undefined) {
    writeFileSync(options.reportPath, `${JSON.stringify(report, null, 2)}\n`);
  }
  return report;
}

function startAggregator(options: ScaleOptions, brokerUrl: string): ChildNode {
  const count = String(options.vehicles);
  return new ChildNode({
    name: 'aggregator',
    script: 'aggregator/main.ts',
    maxOldSpaceMb: options.aggregatorHeapMb,
    args: [
      ...['--fleet-id', options.fleetId],
      ...['--broker-url', brokerUrl],
      ...['--state-dir', path.join(options.stateDir, 'aggregator')],
      ...['--base-weights', options.baseWeightsPath],
      ...['--trainable-layers', options.trainableLayers.join(',')],
      ...['--min-vehicles-online', count],
      ...['--min-updates', count],
      // The round opens once every vehicle is online, so the wait is
      // bounded by the vehicles' connect time instead.
      ...['--online-wait-timeout-ms', String(24 * 3600 * 1000)],
      ...['--round-timeout-ms', String(options.roundTimeoutMs)],
      ...['--max-rounds', String(options.rounds)],
      ...['--seed', String(options.seed)],
      ...['--log-level', 'info'],
    ],
  });
}

function trainTemplates(options: ScaleOptions): Promise<DeltaTemplate[]> {
  return trainDeltaTemplates({
    baseWeightsPath: options.baseWeightsPath,
    dataDir: options.dataDir,
    trainableLayers: options.trainableLayers,
    templateCount: options.templates,
    imageCount: options.templateImages,
    seed: options.seed,
    log: options.log,
  });
}

/** Records the aggregator's round lines by round number and message. */
function collectRoundLines(
  aggregator: ChildNode,
): Map<string, LogRecord & { readAtMs: number }> {
  const lines = new Map<string, LogRecord & { readAtMs: number }>();
  const kept = ['round opened', 'round closed', 'round failed'];
  aggregator.onLog((record) => {
    if (record.msg !== undefined && kept.includes(record.msg)) {
      lines.set(`${record.msg}:${record.round}`, {
        ...record,
        readAtMs: Date.now(),
      });
    }
  });
  return lines;
}

/** Waits for `round` to open and end, and returns its row. */
async function runRound(
  options: ScaleOptions,
  aggregator: ChildNode,
  fleet: LightFleet,
  lines: Map<string, LogRecord & { readAtMs: number }>,
  round: number,
  progress: ScaleProgress,
): Promise<ScaleRoundRow> {
  const { signal } = options;
  const isRound = (record: LogRecord): boolean => record.round === round;
  const opened =
    lines.get(`round opened:${round}`) ??
    (await aggregator.waitForLog(
      'round opened',
      START_TIMEOUT_MS,
      signal,
      isRound,
    ));
  const openedAtMs = lines.get(`round opened:${round}`)?.readAtMs ?? Date.now();

  const ticker = setInterval(() => {
    const counts = fleet.countsOf(round);
    progress.show(
      `round ${round} acks`,
      counts.acksAccepted + counts.acksRejected,
    );
  }, 500);
  let ended: LogRecord;
  try {
    const limitMs = options.roundTimeoutMs + START_TIMEOUT_MS;
    ended = await aggregator.waitForLog(
      ['round closed', 'round failed'],
      limitMs,
      signal,
      isRound,
    );
  } finally {
    clearInterval(ticker);
  }
  const endedAtMs = Date.now();
  const outcome = ended.msg === 'round closed' ? 'closed' : 'failed';
  const accepted = Number(ended.accepted ?? 0);
  const rejected = Number(ended.rejected ?? 0);
  await waitForAcks(fleet, round, accepted + rejected, signal);
  const counts = fleet.countsOf(round);
  progress.show(
    `round ${round} acks`,
    counts.acksAccepted + counts.acksRejected,
    true,
  );
  return {
    ...counts,
    outcome,
    trigger: String(ended.trigger ?? ''),
    modelVersion: Number(ended.modelVersion ?? 0),
    selected: Number(opened.selected ?? 0),
    accepted,
    rejected,
    failureCode: outcome === 'failed' ? String(ended.code ?? '') : '',
    wallTimeMs: endedAtMs - openedAtMs,
    aggregatorDurationMs: Number(ended.durationMs ?? 0),
  };
}

/** Waits up to ACK_SETTLE_TIMEOUT_MS until the vehicles hold `count` acks. */
async function waitForAcks(
  fleet: LightFleet,
  round: number,
  count: number,
  signal: AbortSignal,
): Promise<void> {
  const deadline = Date.now() + ACK_SETTLE_TIMEOUT_MS;
  while (Date.now() < deadline && !signal.aborted) {
    const counts = fleet.countsOf(round);
    if (counts.acksAccepted + counts.acksRejected >= count) return;
    await delay(50);
  }
}

/** Stops the aggregator, then the vehicles, then the broker. */
async function stopParts(parts: RunParts, log: Logger): Promise<void> {
  const aggregatorExit = await parts.aggregator?.stop(CHILD_STOP_TIMEOUT_MS);
  await parts.fleet?.stop();
  const brokerExit = await parts.broker?.stop(CHILD_STOP_TIMEOUT_MS);
  log.debug({ aggregatorExit, brokerExit }, 'children stopped');
}

/** Rejects with the abort reason when `signal` aborts first. */
function abortable<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(resolve, reject).finally(() => {
      signal.removeEventListener('abort', onAbort);
    });
  });
}

/** Samples this process's memory; the returned function reads the peaks. */
function trackDriverMemory(): () => {
  rssPeakBytes: number;
  heapUsedPeakBytes: number;
} {
  let heapUsedPeakBytes = 0;
  const sample = (): void => {
    const { heapUsed } = process.memoryUsage();
    heapUsedPeakBytes = Math.max(heapUsedPeakBytes, heapUsed);
  };
  const timer = setInterval(sample, 250);
  timer.unref();
  return () => {
    sample();
    clearInterval(timer);
    return {
      rssPeakBytes: process.resourceUsage().maxRSS * 1024,
      heapUsedPeakBytes,
    };
  };
}
