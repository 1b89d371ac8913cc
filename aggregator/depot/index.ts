export { Depot, STATUS_SETTLE_MS, TASK_WAIT_MS } from './depot.ts';
export { DepotRound, partialIdOf } from './collector.ts';
export {
  duplicateAckOf,
  duplicateEntriesOf,
  rejectWithoutTask,
  vehicleAckOf,
} from './acks.ts';
export { assertDistinctBrokers, lookupAddresses } from './broker-addresses.ts';
export type { HostLookup } from './broker-addresses.ts';
export { CountedUpdates, DEFAULT_COUNTED_CAPACITY } from './counted-updates.ts';
export type {
  DepotDecision,
  DepotRoundPhase,
  SealedPartial,
  UpdateCaps,
} from './collector.ts';
export type {
  DepotEvents,
  DepotPartialForwardedEvent,
  DepotPartialSettledEvent,
  DepotRoundStartedEvent,
  DepotUpdateDecidedEvent,
} from './events.ts';
export {
  MAX_RESEND_WAIT_MS,
  PartialForwarder,
  resendWaitMs,
} from './forwarder.ts';
export { DepotJournal } from './journal.ts';
export { DepotPresence } from './presence.ts';
export type { PresenceMessage, PresenceState } from './presence.ts';
export {
  DEFAULT_FORWARD_MARGIN_MS,
  DEFAULT_PARTIAL_ACK_TIMEOUT_MS,
  checkBrokerUrl,
  resolveDepotOptions,
} from './options.ts';
export type { DepotOptions, ResolvedDepotOptions } from './options.ts';
export {
  Relay,
  RelayEchoFilter,
  downstreamRelayFilters,
  isRelayedDown,
  isRelayedUp,
  upstreamRelayFilters,
} from './relay.ts';
