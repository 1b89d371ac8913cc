/**
 * A TCP proxy on loopback between MQTT clients and the broker. It parses
 * both directions with mqtt-packet and calls an interceptor for a verdict
 * on each packet, so a fault injector can drop, repeat, hold or cut
 * traffic with no hooks in the client or the broker.
 */
import { createServer, connect, type Server, type Socket } from 'node:net';
import { generate, parser, type Packet } from 'mqtt-packet';
import type { Logger } from '../../protocol/index.ts';

/** Direction of a packet through the link. */
export type PacketDirection = 'to-broker' | 'to-client';

/**
 * Verdict on one packet: send it on, drop it, send it twice, or send only
 * its first `cutAfterBytes` bytes and then cut the connection, as a
 * network failure in the middle of the packet would.
 */
export type PacketVerdict =
  'forward' | 'drop' | 'duplicate' | { cutAfterBytes: number };

/** The connection a packet travels on. */
export interface LinkConnectionInfo {
  /** Sequence number of the connection on this link, from 1. */
  id: number;
  /** True once either socket has closed. */
  readonly isClosed: boolean;
}

/**
 * Decides the fate of one packet. Packets of one direction and connection
 * are handled one at a time and in order, so a promise that resolves late
 * holds back the packets behind it, as a stalled link would.
 */
export type PacketInterceptor = (
  packet: Packet,
  direction: PacketDirection,
  connection: LinkConnectionInfo,
) => PacketVerdict | Promise<PacketVerdict>;

/** Options of {@link FaultyLink}. */
export interface FaultyLinkOptions {
  /** Name in log lines, for example the vehicle id. */
  name: string;
  brokerPort: number;
  /** Default 127.0.0.1. */
  brokerHost?: string;
  /** Default: forward every packet. */
  intercept?: PacketInterceptor;
  log: Logger;
}

/**
 * Listens on 127.0.0.1 (port chosen by the OS) and opens one broker
 * connection per client connection. NOTE: it speaks MQTT 3.1 and 3.1.1
 * only (the fleet's protocol version 4); MQTT 5 properties would be lost
 * when packets are generated again. It does not apply backpressure, which
 * is fine for the simulator's message sizes on loopback.
 */
export class FaultyLink {
  readonly name: string;
  readonly #options: FaultyLinkOptions;
  readonly #connections = new Set<LinkConnection>();
  #server: Server | undefined;
  #port = 0;
  #isBlocked = false;
  #connectionCount = 0;

  constructor(options: FaultyLinkOptions) {
    if (!Number.isInteger(options.brokerPort) || options.brokerPort <= 0) {
      throw new RangeError(
        `brokerPort must be a positive integer, got ${options.brokerPort}`,
      );
    }
    this.name = options.name;
    this.#options = options;
  }

  /** Starts listening; resolves with the port. */
  async start(): Promise<number> {
    const server = createServer((socket) => this.#accept(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    this.#server = server;
    const address = server.address();
    this.#port =
      typeof address === 'object' && address !== null ? address.port : 0;
    return this.#port;
  }

  get port(): number {
    return this.#port;
  }

  /** URL for an MQTT client, for example mqtt://127.0.0.1:40123. */
  get url(): string {
    return `mqtt://127.0.0.1:${this.#port}`;
  }

  /** Connections accepted since start. */
  get connectionCount(): number {
    return this.#connectionCount;
  }

  /** Packets parsed but not yet forwarded, dropped or cut, on every connection. */
  get heldPackets(): number {
    let held = 0;
    for (const connection of this.#connections) held += connection.heldPackets;
    return held;
  }

  /**
   * While blocked, the link closes every new connection at once, as an
   * unreachable peer would. Connections already open are left as they are.
   */
  setBlocked(isBlocked: boolean): void {
    this.#isBlocked = isBlocked;
  }

  /**
   * Destroys every open connection on both sides without an MQTT
   * DISCONNECT, so the broker publishes the client's last will. Returns
   * the number of connections cut.
   */
  cut(): number {
    const count = this.#connections.size;
    for (const connection of [...this.#connections]) connection.close();
    if (count > 0)
      this.#options.log.debug({ link: this.name, count }, 'link cut');
    return count;
  }

  /** Cuts every connection and stops listening. Safe to call twice. */
  async close(): Promise<void> {
    this.#isBlocked = true;
    this.cut();
    const server = this.#server;
    this.#server = undefined;
    if (server === undefined) return;
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  #accept(client: Socket): void {
    if (this.#isBlocked || this.#server === undefined) {
      client.destroy();
      return;
    }
    this.#connectionCount += 1;
    const broker = connect(
      this.#options.brokerPort,
      this.#options.brokerHost ?? '127.0.0.1',
    );
    const connection = new LinkConnection({
      id: this.#connectionCount,
      client,
      broker,
      intercept: this.#options.intercept ?? (() => 'forward'),
      log: this.#options.log.child({ link: this.name }),
      onClosed: () => this.#connections.delete(connection),
    });
    this.#connections.add(connection);
  }
}

/** One client connection and its broker connection. */
class LinkConnection implements LinkConnectionInfo {
  readonly id: number;
  readonly #sockets: Socket[];
  readonly #pumps: PacketPump[];
  readonly #onClosed: () => void;
  #isClosed = false;

  constructor(options: {
    id: number;
    client: Socket;
    broker: Socket;
    intercept: PacketInterceptor;
    log: Logger;
    onClosed: () => void;
  }) {
    const { client, broker, intercept, log } = options;
    this.id = options.id;
    this.#onClosed = options.onClosed;
    this.#sockets = [client, broker];
    for (const socket of this.#sockets) {
      socket.setNoDelay(true);
      socket.on('error', (err) => {
        log.debug({ err, connection: this.id }, 'link socket error');
        this.close();
      });
      socket.on('close', () => this.close());
    }
    this.#pumps = [
      new PacketPump(client, broker, 'to-broker', this, intercept, log),
      new PacketPump(broker, client, 'to-client', this, intercept, log),
    ];
  }

  get isClosed(): boolean {
    return this.#isClosed;
  }

  get heldPackets(): number {
    return this.#pumps.reduce((sum, pump) => sum + pump.heldPackets, 0);
  }

  close(): void {
    if (this.#isClosed) return;
    this.#isClosed = true;
    for (const socket of this.#sockets) socket.destroy();
    this.#onClosed();
  }
}

/** Parses one direction and forwards packets in order through the interceptor. */
class PacketPump {
  readonly #sink: Socket;
  readonly #direction: PacketDirection;
  readonly #connection: LinkConnection;
  readonly #intercept: PacketInterceptor;
  readonly #log: Logger;
  readonly #queue: Packet[] = [];
  #isDraining = false;

  constructor(
    source: Socket,
    sink: Socket,
    direction: PacketDirection,
    connection: LinkConnection,
    intercept: PacketInterceptor,
    log: Logger,
  ) {
    this.#sink = sink;
    this.#direction = direction;
    this.#connection = connection;
    this.#intercept = intercept;
    this.#log = log;
    // Protocol version 4 for the broker's packets; the client's CONNECT
    // carries its own version, which the parser then uses.
    const packets = parser({ protocolVersion: 4 });
    packets.on('packet', (packet: Packet) => {
      this.#queue.push(packet);
      void this.#drain();
    });
    packets.on('error', (err: unknown) => {
      log.warn({ err, direction }, 'link received an invalid mqtt packet');
      connection.close();
    });
    source.on('data', (chunk: Buffer) => packets.parse(chunk));
  }

  get heldPackets(): number {
    return this.#queue.length + (this.#isDraining ? 1 : 0);
  }

  async #drain(): Promise<void> {
    if (this.#isDraining) return;
    this.#isDraining = true;
    try {
      while (this.#queue.length > 0 && !this.#connection.isClosed) {
        const packet = this.#queue.shift()!;
        let verdict: PacketVerdict;
        try {
          verdict = await this.#intercept(
            packet,
            this.#direction,
            this.#connection,
          );
        } catch (err) {
          this.#log.error(
            { err, cmd: packet.cmd },
            'packet interceptor failed',
          );
          verdict = 'forward';
        }
        if (this.#connection.isClosed) break;
        this.#apply(packet, verdict);
      }
    } finally {
      this.#isDraining = false;
      if (this.#connection.isClosed) this.#queue.length = 0;
    }
  }

  #apply(packet: Packet, verdict: PacketVerdict): void {
    if (verdict === 'drop') return;
    const bytes = generate(packet);
    if (verdict === 'forward') {
      this.#sink.write(bytes);
    } else if (verdict === 'duplicate') {
      this.#sink.write(bytes);
      this.#sink.write(bytes);
    } else {
      const count = Math.max(0, Math.min(bytes.length, verdict.cutAfterBytes));
      this.#sink.write(bytes.subarray(0, count), () =>
        this.#connection.close(),
      );
    }
  }
}
