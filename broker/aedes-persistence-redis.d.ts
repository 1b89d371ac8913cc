/**
 * Types of the parts of aedes-persistence-redis 11 that broker/redis.ts
 * uses; the package ships no declarations.
 */
declare module 'aedes-persistence-redis' {
  import type { Redis } from 'ioredis';

  namespace aedesPersistenceRedis {
    interface RedisPersistenceOptions {
      /** Connection to use instead of one the package opens itself. */
      conn?: Redis;
      /** Queued messages delivered to a client at CONNECT. Default 1000. */
      maxSessionDelivery?: number;
    }

    /** The persistence aedes takes as its `persistence` option. */
    interface RedisPersistence {
      setup(broker: unknown): Promise<void>;
      /** Stores subscriptions, then waits for their broadcast to return. */
      addSubscriptions(
        client: { id: string },
        subscriptions: object[],
      ): Promise<unknown>;
      /** Removes subscriptions, then waits for their broadcast to return. */
      removeSubscriptions(
        client: { id: string },
        topics: string[],
      ): Promise<unknown>;
      /** Stops listening for subscription changes, disconnects `conn`. */
      destroy(): Promise<void>;
    }
  }

  function aedesPersistenceRedis(
    options?: aedesPersistenceRedis.RedisPersistenceOptions,
  ): aedesPersistenceRedis.RedisPersistence;

  export = aedesPersistenceRedis;
}
