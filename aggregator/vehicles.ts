import {
  VehicleState,
  decodeVehicleStatus,
  isFleetError,
  type Logger,
  type VehicleStatus,
} from '../protocol/index.ts';

/** Maximum length of a vehicle id copied into a log line. */
const MAX_LOGGED_ID_CHARS = 130;

/**
 * Online vehicles, from their retained VehicleStatus messages. A vehicle is
 * online while its last status is ONLINE or TRAINING. Its offline last
 * will, or an empty retained message, removes it.
 */
export class VehicleRegistry {
  readonly #online = new Map<string, VehicleStatus>();
  /** Highest connection id seen per vehicle. */
  readonly #connectionIds = new Map<string, number>();
  readonly #listeners = new Set<() => void>();

  /**
   * Applies the latest status of `vehicleId` (undefined when the retained
   * status was cleared). Returns whether the vehicle went on- or offline.
   */
  update(vehicleId: string, status: VehicleStatus | undefined): boolean {
    const wasOnline = this.#online.has(vehicleId);
    const isOnline =
      status !== undefined &&
      (status.state === VehicleState.Online ||
        status.state === VehicleState.Training);
    if (isOnline) this.#online.set(vehicleId, status);
    else this.#online.delete(vehicleId);

    const isChanged = wasOnline !== isOnline;
    if (isChanged) for (const listener of [...this.#listeners]) listener();
    return isChanged;
  }

  /**
   * Applies a message from the status topic of `vehicleId`: a protobuf
   * VehicleStatus, or an empty payload when the retained status was
   * cleared. Logs and ignores a status that does not decode or that names
   * another vehicle.
   */
  applyStatusMessage(
    vehicleId: string,
    payload: Uint8Array,
    log: Logger,
  ): void {
    let status: VehicleStatus | undefined;
    try {
      status =
        payload.byteLength === 0 ? undefined : decodeVehicleStatus(payload);
    } catch (err) {
      if (!isFleetError(err)) throw err;
      log.warn({ vehicleId, code: err.code, err }, 'invalid vehicle status');
      return;
    }
    if (status !== undefined && status.vehicleId !== vehicleId) {
      const payloadVehicleId = status.vehicleId.slice(0, MAX_LOGGED_ID_CHARS);
      log.warn(
        { vehicleId, payloadVehicleId },
        'vehicle status names another vehicle',
      );
      return;
    }

    if (status !== undefined && this.#isStale(vehicleId, status)) {
      log.debug(
        { vehicleId, state: status.state, connectionId: status.connectionId },
        'stale vehicle status ignored',
      );
      return;
    }
    if (this.update(vehicleId, status)) {
      const online = this.onlineCount;
      log.debug(
        { vehicleId, online, state: status?.state },
        'vehicle status changed',
      );
    }
  }

  /**
   * Tells whether `status` comes from an older connection than one seen
   * before. A broker may deliver the retained last will of a closed
   * connection after the first status of the next one.
   */
  #isStale(vehicleId: string, status: VehicleStatus): boolean {
    const latest = this.#connectionIds.get(vehicleId) ?? 0;
    if (status.connectionId < latest) return true;
    this.#connectionIds.set(vehicleId, status.connectionId);
    return false;
  }

  /** numExamples of an online vehicle's latest status, if it gave one. */
  examplesOf(vehicleId: string): number | undefined {
    const count = this.#online.get(vehicleId)?.numExamples;
    return count === undefined || count <= 0 ? undefined : count;
  }

  /** Ids of the online vehicles. */
  onlineIds(): string[] {
    return [...this.#online.keys()];
  }

  /** Copies of the latest status of each online vehicle. */
  onlineStatuses(): VehicleStatus[] {
    return [...this.#online.values()].map((status) => ({ ...status }));
  }

  get onlineCount(): number {
    return this.#online.size;
  }

  /** Resolves at the next on- or offline change, after `timeoutMs`, or on abort. */
  waitForChange(timeoutMs: number, signal: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.#listeners.delete(done);
        signal.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(done, Math.max(0, timeoutMs));
      this.#listeners.add(done);
      signal.addEventListener('abort', done);
      if (signal.aborted) done();
    });
  }
}

/** Targets of {@link waitForVehicles}. */
export interface VehicleWaitOptions {
  /** Online vehicles wanted before a round opens. */
  target: number;
  /** Online vehicles enough once `timeoutMs` has passed. */
  minimum: number;
  timeoutMs: number;
  signal: AbortSignal;
  log: Logger;
}

/**
 * Waits until `target` vehicles are online, or `minimum` once `timeoutMs`
 * has passed. With fewer than `minimum`, it goes on waiting and logs once
 * per timeout period. Returns the online ids, or undefined on abort.
 */
export async function waitForVehicles(
  registry: VehicleRegistry,
  options: VehicleWaitOptions,
): Promise<string[] | undefined> {
  const { target, minimum, timeoutMs, signal, log } = options;
  let waitStartedMs = Date.now();
  let isLogged = false;
  while (!signal.aborted) {
    const online = registry.onlineIds();
    if (online.length >= target) return online;

    const waitedMs = Date.now() - waitStartedMs;
    if (waitedMs >= timeoutMs) {
      if (online.length >= minimum) {
        log.warn(
          { online: online.length, target, waitedMs },
          'opening round with fewer vehicles than requested',
        );
        return online;
      }
      waitStartedMs = Date.now();
      isLogged = false;
    }
    if (!isLogged) {
      log.info(
        { online: online.length, target, minimum },
        'waiting for vehicles',
      );
      isLogged = true;
    }
    await registry.waitForChange(
      waitStartedMs + timeoutMs - Date.now(),
      signal,
    );
  }
  return undefined;
}
