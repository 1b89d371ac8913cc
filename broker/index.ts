export { startBroker } from './broker.ts';
export type { BrokerOptions, RunningBroker } from './broker.ts';
