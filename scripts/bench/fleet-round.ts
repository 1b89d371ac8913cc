/**
 * One federated round of the simulated fleet (scripts/sim): embedded
 * broker, aggregator and every vehicle agent in this process, on real
 * images. Reports the round's wall time and the bytes each way.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createLogger } from '../../protocol/index.ts';
import { runSimulation } from '../sim/fleet.ts';

export interface FleetRoundResult {
  vehicles: number;
  accepted: number;
  /** Wall time of the round, task published to model released. */
  roundSeconds: number;
  /** Wall time of the whole run: data, base evaluation, round, report. */
  runSeconds: number;
  /** Update bytes the aggregator received in the round. */
  uplinkBytes: number;
  /** Task and release bytes the vehicles received. */
  downlinkBytes: number;
  uplinkBytesPerVehicle: number;
  trainingBackend: string;
}

export async function benchFleetRound(options: {
  vehicles: number;
  dataDir: string;
  seed: number;
}): Promise<FleetRoundResult> {
  const stateDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-bench-'));
  try {
    const started = Date.now();
    const report = await runSimulation({
      vehicles: options.vehicles,
      rounds: 1,
      dataDir: options.dataDir,
      seed: options.seed,
      alpha: 0.5,
      localEpochs: 1,
      batchSize: 32,
      learningRate: 0.001,
      proximalMu: 0,
      restrictToLocalClasses: true,
      trainLayers: ['dense1', 'dense2'],
      minUpdates: options.vehicles,
      roundTimeoutMs: 600_000,
      stateDir: path.join(stateDir, 'state'),
      centralized: false,
      faults: [],
      faultRate: 0.25,
      secure: false,
      attackers: 0,
      attack: 'boost',
      attackScale: 1,
      aggregation: 'fedavg',
      byzantineCount: 0,
      trimFraction: 0.2,
      multiKrumSelect: 0,
      progress: false,
      log: createLogger({ level: 'warn', name: 'bench' }),
    });
    const round = report.rounds[0];
    return {
      vehicles: options.vehicles,
      accepted: round.accepted,
      roundSeconds: round.durationMs / 1000,
      runSeconds: (Date.now() - started) / 1000,
      uplinkBytes: round.uplinkBytes,
      downlinkBytes: round.downlinkBytes,
      uplinkBytesPerVehicle: round.uplinkBytes / Math.max(1, round.accepted),
      trainingBackend: report.backend,
    };
  } finally {
    rmSync(stateDir, { recursive: true, force: true });
  }
}
