import { VehicleState, type VehicleStatus } from '../protocol/index.ts';

/**
 * Online vehicles, from their retained VehicleStatus messages. A vehicle is
 * online while its last status is ONLINE or TRAINING; its offline last
 * will, or an empty retained message, removes it.
 */
export class VehicleRegistry {
  readonly #online = new Map<string, VehicleStatus>();

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
    return wasOnline !== isOnline;
  }

  /** Ids of the online vehicles. */
  onlineIds(): string[] {
    return [...this.#online.keys()];
  }

  get onlineCount(): number {
    return this.#online.size;
  }
}
