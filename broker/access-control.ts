/**
 * Authentication and authorization hooks of the aedes broker: who a client
 * is (certificate or password), which client id it may use, which topics
 * it may touch, and how much and how fast it may publish.
 */
import { TLSSocket } from 'node:tls';
import type {
  AedesOptions,
  AuthenticateError,
  Client,
  ConnectPacket,
  PublishPacket,
  Subscription,
} from 'aedes';
import {
  clientIdOf,
  clientIdsOf,
  formatIdentityUri,
  type FleetIdentity,
  type FleetRole,
  type Logger,
} from '../protocol/index.ts';
import {
  isPublishAllowed,
  isSubscribeAllowed,
  topicRulesOf,
  type TopicRules,
} from './acl.ts';
import {
  AccessDeniedError,
  BAD_USERNAME_OR_PASSWORD,
  IDENTIFIER_REJECTED,
  NOT_AUTHORIZED,
  identifyPeerCertificate,
  type Identified,
} from './identity.ts';
import { RepeatedLogLimiter } from './log-limiter.ts';
import type { PasswordDirectory } from './passwords.ts';
import { TokenBucket, type ClientLimits } from './rate-limit.ts';

/** State the broker keeps per authenticated connection. */
interface ClientSession extends Identified {
  client: Client;
  /** `formatIdentityUri(identity)`, the identity field of log lines. */
  uri: string;
  rules: TopicRules;
  limits: ClientLimits;
  bucket: TokenBucket;
}

/** Options of {@link AccessControl}. */
export interface AccessControlOptions {
  /**
   * When false, clients without an identity are admitted and nothing is
   * checked: development on loopback only.
   */
  requireIdentity: boolean;
  passwords?: PasswordDirectory;
  limits: Record<FleetRole, ClientLimits>;
  log: Logger;
}

/**
 * The broker's access control. `hooks()` returns the aedes handlers;
 * sessions are keyed by client object and by client id.
 */
export class AccessControl {
  readonly #options: AccessControlOptions;
  readonly #log: Logger;
  #passwords: PasswordDirectory | undefined;
  readonly #sessions = new WeakMap<Client, ClientSession>();
  /** Live sessions by client id, to reject a second identity. */
  readonly #byClientId = new Map<string, ClientSession>();
  readonly #willTopics = new WeakMap<Client, ConnectPacket['will']>();
  readonly #limiter = new RepeatedLogLimiter();

  constructor(options: AccessControlOptions) {
    this.#options = options;
    this.#log = options.log;
    this.#passwords = options.passwords;
  }

  /** True when clients must authenticate and the ACL applies. */
  get enforcing(): boolean {
    return this.#options.requireIdentity;
  }

  /** Replaces the password directory, for a reload of the users file. */
  setPasswords(passwords: PasswordDirectory | undefined): void {
    this.#passwords = passwords;
  }

  /** The aedes handlers. */
  hooks(): Pick<
    AedesOptions,
    'preConnect' | 'authenticate' | 'authorizePublish' | 'authorizeSubscribe'
  > {
    return {
      preConnect: (client, packet, callback) => {
        this.#willTopics.set(client, packet.will);
        callback(null, true);
      },
      authenticate: (client, username, password, callback) => {
        this.#authenticate(client, username, password).then(
          () => callback(null, true),
          (err: AuthenticateError) => callback(err, false),
        );
      },
      authorizePublish: (client, packet, callback) =>
        callback(this.#checkPublish(client, packet)),
      authorizeSubscribe: (client, subscription, callback) =>
        callback(null, this.#checkSubscribe(client, subscription)),
    };
  }

  /**
   * Closes the connections whose certificate serial is in `revoked` or
   * whose password user is no longer listed. Returns how many it closed.
   */
  closeRevoked(revoked: ReadonlySet<string>): number {
    let closed = 0;
    for (const session of [...this.#byClientId.values()]) {
      const revokedCertificate =
        session.certificateSerial !== undefined &&
        revoked.has(session.certificateSerial);
      const removedUser =
        session.method === 'password' &&
        !(this.#passwords?.has(session.username!) ?? false);
      if (!revokedCertificate && !removedUser) continue;
      this.#log.warn(
        {
          clientId: session.client.id,
          identity: session.uri,
          method: session.method,
        },
        'client disconnected, credentials revoked',
      );
      session.client.close();
      closed += 1;
    }
    return closed;
  }

  /**
   * Logs a denial at warn, at most once per 30 s for one message, client
   * id, identity and topic, because a rejected client reconnects and
   * retries.
   */
  #warn(fields: Record<string, unknown>, message: string): void {
    const key = [
      message,
      fields.clientId,
      fields.identity,
      fields.username,
      fields.topic,
    ].join('\u0000');
    const skipped = this.#limiter.admit(key);
    if (skipped === undefined) return;
    this.#log.warn(skipped > 0 ? { ...fields, skipped } : fields, message);
  }

  async #authenticate(
    client: Client,
    username: string | undefined,
    password: Buffer | undefined,
  ): Promise<void> {
    const found = await this.#identify(client, username, password);
    if (found === undefined) return; // open mode, no checks

    const uri = formatIdentityUri(found.identity);
    const fields = { clientId: client.id, identity: uri };
    const expectedClientId = clientIdOf(found.identity);
    if (!clientIdsOf(found.identity).includes(client.id)) {
      this.#warn(
        { ...fields, expectedClientId },
        'client rejected, client id does not match identity',
      );
      throw new AccessDeniedError(
        `client id ${client.id} does not match identity ${uri}`,
        IDENTIFIER_REJECTED,
      );
    }
    this.#checkClientIdFree(client, uri);
    this.#checkWill(client, found.identity, uri);

    const limits = this.#options.limits[found.identity.role];
    const session: ClientSession = {
      ...found,
      client,
      uri,
      rules: topicRulesOf(found.identity),
      limits,
      bucket: new TokenBucket(limits.publishBurst, limits.publishesPerSecond),
    };
    this.#sessions.set(client, session);
    this.#byClientId.set(client.id, session);
    client.conn.once('close', () => {
      if (this.#byClientId.get(client.id) === session) {
        this.#byClientId.delete(client.id);
      }
    });
    this.#log.info({ ...fields, method: found.method }, 'client authenticated');
  }

  /**
   * Returns the verified identity of `client`, or undefined in open mode.
   * A certificate verified by the TLS layer wins over a password.
   */
  async #identify(
    client: Client,
    username: string | undefined,
    password: Buffer | undefined,
  ): Promise<Identified | undefined> {
    const socket = client.conn;
    if (socket instanceof TLSSocket && socket.authorized) {
      return this.#identifyCertificate(client, socket);
    }
    if (username !== undefined && this.#passwords !== undefined) {
      const identity = await this.#passwords.authenticate(
        username,
        password ?? Buffer.alloc(0),
      );
      if (identity === undefined) {
        this.#warn(
          { clientId: client.id, username },
          'client rejected, wrong username or password',
        );
        throw new AccessDeniedError(
          `wrong username or password for ${username}`,
          BAD_USERNAME_OR_PASSWORD,
        );
      }
      return { identity, method: 'password', username };
    }
    if (!this.#options.requireIdentity) return undefined;
    this.#warn(
      { clientId: client.id },
      'client rejected, no certificate or password',
    );
    throw new AccessDeniedError('client has no identity', NOT_AUTHORIZED);
  }

  #identifyCertificate(client: Client, socket: TLSSocket): Identified {
    const found = identifyPeerCertificate(socket);
    if (found.identified !== undefined) return found.identified;
    this.#warn(
      {
        clientId: client.id,
        subject: found.subject,
        identities: found.identityCount,
      },
      'client rejected, certificate has no single fleet identity',
    );
    throw new AccessDeniedError(
      'certificate has no single fleet identity',
      NOT_AUTHORIZED,
    );
  }

  /**
   * Rejects a client id held by a live connection of another identity.
   * MQTT lets a new connection take over a client id (MQTT-3.1.4-2); the
   * same identity still may, so a vehicle that lost its link reconnects.
   */
  #checkClientIdFree(client: Client, uri: string): void {
    const holder = this.#byClientId.get(client.id);
    if (holder === undefined || holder.client.closed) return;
    if (holder.uri === uri) {
      this.#log.info(
        { clientId: client.id, identity: uri },
        'client id taken over by the same identity',
      );
      return;
    }
    this.#warn(
      { clientId: client.id, identity: uri, holderIdentity: holder.uri },
      'client rejected, client id in use by another identity',
    );
    throw new AccessDeniedError(
      `client id ${client.id} is in use by another identity`,
      IDENTIFIER_REJECTED,
    );
  }

  /** Rejects a last will that the identity could not publish itself. */
  #checkWill(client: Client, identity: FleetIdentity, uri: string): void {
    const will = this.#willTopics.get(client);
    this.#willTopics.delete(client);
    if (will === undefined || will === null) return;
    const limits = this.#options.limits[identity.role];
    const bytes = Buffer.byteLength(will.payload);
    if (
      isPublishAllowed(topicRulesOf(identity), will.topic) &&
      bytes <= limits.maxMessageBytes
    ) {
      return;
    }
    this.#warn(
      { clientId: client.id, identity: uri, topic: will.topic, bytes },
      'client rejected, last will denied',
    );
    throw new AccessDeniedError(
      `last will on ${will.topic} denied`,
      NOT_AUTHORIZED,
    );
  }

  /**
   * Returns null to allow the publish, or an error on which aedes closes
   * the connection. MQTT 3.1.1 lets a server that does not authorize a
   * PUBLISH either acknowledge it or close the connection (MQTT-3.3.5-2).
   * Closing makes the refusal visible to the client.
   */
  #checkPublish(client: Client | null, packet: PublishPacket): Error | null {
    // aedes passes no client for a will stored by an earlier broker run;
    // the will was checked when that client connected.
    if (client === null) return null;
    const session = this.#sessions.get(client);
    if (session === undefined) {
      if (!this.#options.requireIdentity && !packet.topic.startsWith('$SYS/')) {
        return null;
      }
      return new AccessDeniedError(`publish to ${packet.topic} denied`);
    }

    const fields = {
      clientId: client.id,
      identity: session.uri,
      topic: packet.topic,
    };
    if (!isPublishAllowed(session.rules, packet.topic)) {
      this.#warn(fields, 'publish denied');
      return new AccessDeniedError(`publish to ${packet.topic} denied`);
    }
    // aedes publishes the last will after the connection closed; it was
    // checked at CONNECT and must not be lost to an empty bucket.
    if (client.closed) return null;

    const bytes = Buffer.byteLength(packet.payload);
    const { maxMessageBytes, publishesPerSecond, publishBurst } =
      session.limits;
    if (bytes > maxMessageBytes) {
      this.#warn(
        { ...fields, bytes, maxMessageBytes },
        'publish dropped, message too large',
      );
      return new AccessDeniedError(
        `message of ${bytes} bytes exceeds ${maxMessageBytes}`,
      );
    }
    if (!session.bucket.tryTake()) {
      this.#warn(
        { ...fields, publishesPerSecond, publishBurst },
        'publish dropped, rate limit exceeded',
      );
      return new AccessDeniedError('publish rate limit exceeded');
    }
    return null;
  }

  /** Returns the subscription, or null to deny it (SUBACK 0x80). */
  #checkSubscribe(
    client: Client,
    subscription: Subscription,
  ): Subscription | null {
    const session = this.#sessions.get(client);
    if (session === undefined) {
      return this.#options.requireIdentity ? null : subscription;
    }
    if (isSubscribeAllowed(session.rules, subscription.topic)) {
      return subscription;
    }
    this.#warn(
      {
        clientId: client.id,
        identity: session.uri,
        topic: subscription.topic,
      },
      'subscribe denied',
    );
    return null;
  }
}
