export { startBroker, DEFAULT_CLIENT_LIMITS } from './broker.ts';
export type { BrokerOptions, RunningBroker } from './broker.ts';
export type { BrokerTlsOptions } from './listener.ts';
export {
  DEFAULT_REDIS_CLOSE_TIMEOUT_MS,
  DEFAULT_REDIS_CONNECT_TIMEOUT_MS,
  connectRedis,
  parseRedisUrl,
  redactRedisUrl,
} from './redis.ts';
export type { RedisBackend, RedisBackendOptions } from './redis.ts';
export { isLoopbackHost } from './listener.ts';
export type { ClientLimits } from './rate-limit.ts';
export { TokenBucket } from './rate-limit.ts';
export {
  filterCoversFilter,
  filterMatchesTopic,
  isPublishAllowed,
  isSubscribeAllowed,
  topicRulesOf,
} from './acl.ts';
export type { TopicRules } from './acl.ts';
export {
  PasswordDirectory,
  createPasswordUser,
  readUsersFile,
  saveUser,
  verifyPassword,
} from './passwords.ts';
export type { PasswordUser, UsersFile } from './passwords.ts';
