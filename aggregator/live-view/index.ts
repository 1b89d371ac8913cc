export {
  MAX_RECENT_UPDATES,
  MAX_ROUNDS_KEPT,
  MAX_VEHICLES_LISTED,
} from './fleet-state.ts';
export type {
  CurrentRoundView,
  FleetSnapshot,
  RoundView,
  UpdateView,
  VehicleView,
} from './fleet-state.ts';
export { parseLiveViewPort } from './port.ts';
export { LIVE_VIEW_HOST, startLiveView } from './server.ts';
export type { LiveView, LiveViewOptions } from './server.ts';
export type { LiveViewSource } from './source.ts';
