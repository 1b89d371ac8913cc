/**
 * The broker's network listener: plain TCP for development, or TLS with
 * optional or required client certificates checked against the fleet CA
 * and its CRL.
 */
import { readFileSync } from 'node:fs';
import {
  createServer as createTcpServer,
  isIP,
  type Server,
  type Socket,
} from 'node:net';
import {
  createServer as createTlsServer,
  type SecureContextOptions,
  type TLSSocket,
  type Server as TlsServer,
} from 'node:tls';
import {
  ErrorCode,
  FleetError,
  assertPrivateKeyFile,
  type Logger,
} from '../protocol/index.ts';
import { parseRevocationList, type RevocationList } from './crl.ts';
import { RepeatedLogLimiter } from './log-limiter.ts';

/** TLS settings of the broker, as paths of PEM files. */
export interface BrokerTlsOptions {
  /** Broker certificate; its SAN must name the host clients connect to. */
  certPath: string;
  /** Broker private key. */
  keyPath: string;
  /**
   * Fleet CA certificate. When set, the broker requests a client
   * certificate and verifies it against this CA.
   */
  caPath?: string;
  /** CRL of the fleet CA; requires `caPath`. */
  crlPath?: string;
  /**
   * Close connections that present no client certificate. Default true
   * when `caPath` is set. With false, such clients can authenticate with
   * a username and password instead.
   */
  requireClientCertificate?: boolean;
}

/** A listening server and what it needs to reload its TLS files. */
export interface Listener {
  server: Server | TlsServer;
  /** True when the listener speaks TLS. */
  secure: boolean;
  /** True when clients may present certificates that the CA verifies. */
  verifiesClientCertificates: boolean;
  /**
   * Re-reads the TLS files and applies them to new connections. Returns
   * the CRL read, if any. Undefined for a plain TCP listener.
   */
  reload?: () => RevocationList | undefined;
}

/** Days before a CRL's nextUpdate from which the broker warns. */
const CRL_EXPIRY_WARNING_DAYS = 7;

/** True for `localhost` and loopback IPv4 and IPv6 addresses. */
export function isLoopbackHost(host: string): boolean {
  if (host === 'localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  return host === '::1' || host === '0:0:0:0:0:0:0:1';
}

function readTlsFile(kind: string, file: string): Buffer {
  try {
    return readFileSync(file);
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `broker ${kind} file ${file} cannot be read: ${(err as Error).message}`,
      { cause: err },
    );
  }
}

/** Checks the TLS option combination and returns requireClientCertificate. */
export function checkTlsOptions(tls: BrokerTlsOptions): boolean {
  const require = tls.requireClientCertificate ?? tls.caPath !== undefined;
  if (require && tls.caPath === undefined) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      'requireClientCertificate needs caPath, the CA that signs client ' +
        'certificates',
    );
  }
  if (tls.crlPath !== undefined && tls.caPath === undefined) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `crlPath ${tls.crlPath} needs caPath, the CA that issued the CRL`,
    );
  }
  return require;
}

function warnIfCrlExpires(list: RevocationList, file: string, log: Logger) {
  if (list.nextUpdate === undefined) return;
  const remainingMs = list.nextUpdate.getTime() - Date.now();
  const fields = { crlPath: file, nextUpdate: list.nextUpdate.toISOString() };
  if (remainingMs <= 0) {
    log.error(
      fields,
      'crl expired, every client certificate is rejected; run provision crl',
    );
  } else if (remainingMs < CRL_EXPIRY_WARNING_DAYS * 86_400_000) {
    log.warn(fields, 'crl expires soon; run provision crl');
  }
}

/** Reads the TLS files into secure context options and the parsed CRL. */
function loadTlsContext(
  tls: BrokerTlsOptions,
  log: Logger,
): { context: SecureContextOptions; crl: RevocationList | undefined } {
  // The same rule as for the agent and aggregator keys: mode 0600.
  assertPrivateKeyFile(tls.keyPath);
  const context: SecureContextOptions = {
    cert: readTlsFile('certificate', tls.certPath),
    key: readTlsFile('private key', tls.keyPath),
    minVersion: 'TLSv1.2',
  };
  if (tls.caPath !== undefined) context.ca = readTlsFile('CA', tls.caPath);
  let crl: RevocationList | undefined;
  if (tls.crlPath !== undefined) {
    const contents = readTlsFile('CRL', tls.crlPath);
    crl = parseRevocationList(contents, tls.crlPath);
    warnIfCrlExpires(crl, tls.crlPath, log);
    context.crl = contents;
  }
  return { context, crl };
}

/**
 * Returns true when a TLS connection may go on to MQTT: its certificate
 * verified, or it sent none and certificates are optional. Otherwise logs
 * the reason at warn, at most once per 30 s for one certificate or
 * address, and returns false.
 */
function admitTlsSocket(
  socket: TLSSocket,
  requireCertificate: boolean,
  log: Logger,
  limiter: RepeatedLogLimiter,
): boolean {
  if (socket.authorized) return true;
  const remoteAddress = socket.remoteAddress;
  const peer = socket.getPeerCertificate();
  if (peer !== null && Object.keys(peer).length > 0) {
    const reason = String(socket.authorizationError);
    const skipped = limiter.admit(`${reason}:${peer.serialNumber}`);
    if (skipped !== undefined) {
      log.warn(
        {
          remoteAddress,
          reason,
          serialNumber: peer.serialNumber,
          ...(skipped > 0 && { skipped }),
        },
        'client certificate rejected',
      );
    }
    return false;
  }
  if (requireCertificate) {
    const skipped = limiter.admit(`missing:${remoteAddress}`);
    if (skipped !== undefined) {
      log.warn(
        { remoteAddress, ...(skipped > 0 && { skipped }) },
        'client certificate missing',
      );
    }
    return false;
  }
  return true;
}

/**
 * Creates the server for `handle`, which aedes gives. Without `tls` it is
 * plain TCP. With `tls` every connection completes the TLS handshake. A
 * connection whose client certificate fails verification (unknown CA,
 * revoked, expired) is logged and closed before the broker reads any MQTT
 * packet, and so is one without a certificate when one is required.
 *
 * @throws {FleetError} INVALID_CONFIG for an unreadable TLS file, an
 *   invalid CRL or an impossible option combination.
 */
export function createListener(
  handle: (socket: Socket) => void,
  tls: BrokerTlsOptions | undefined,
  log: Logger,
): Listener {
  if (tls === undefined) {
    return {
      server: createTcpServer((socket) => handle(socket)),
      secure: false,
      verifiesClientCertificates: false,
    };
  }
  const requireCertificate = checkTlsOptions(tls);
  const verifies = tls.caPath !== undefined;
  const { context } = loadTlsContext(tls, log);
  const server = createTlsServer({
    ...context,
    // Verification runs in admitTlsSocket, so that a rejected client is
    // logged with the reason OpenSSL gave.
    requestCert: verifies,
    rejectUnauthorized: false,
  });
  const limiter = new RepeatedLogLimiter();
  server.on('secureConnection', (socket: TLSSocket) => {
    if (admitTlsSocket(socket, requireCertificate, log, limiter)) {
      handle(socket);
    } else {
      socket.destroy();
    }
  });
  server.on('tlsClientError', (err, socket) => {
    const remoteAddress = socket.remoteAddress;
    const skipped = limiter.admit(`handshake:${remoteAddress}:${err.message}`);
    if (skipped === undefined) return;
    log.warn(
      { err, remoteAddress, ...(skipped > 0 && { skipped }) },
      'tls handshake failed',
    );
  });
  const reload = (): RevocationList | undefined => {
    const loaded = loadTlsContext(tls, log);
    server.setSecureContext(loaded.context);
    return loaded.crl;
  };
  return { server, secure: true, verifiesClientCertificates: verifies, reload };
}
