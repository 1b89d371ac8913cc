/** Verified client identities and the errors that reject a client. */
import type { TLSSocket } from 'node:tls';
import type { AuthenticateError } from 'aedes';
import {
  identitiesOfCertificate,
  type FleetIdentity,
} from '../protocol/index.ts';

/** Method by which a client proved its identity. */
export type AuthenticationMethod = 'certificate' | 'password';

/** A verified identity and the method that verified it. */
export interface Identified {
  identity: FleetIdentity;
  method: AuthenticationMethod;
  username?: string;
  /** Lower-case hex without leading zeros, for revocation checks. */
  certificateSerial?: string;
}

/** MQTT 3.1.1 CONNACK return codes that reject a client. */
export const IDENTIFIER_REJECTED = 2;
export const BAD_USERNAME_OR_PASSWORD = 4;
export const NOT_AUTHORIZED = 5;

/**
 * Error passed to aedes for a rejected CONNECT or PUBLISH. The broker logs
 * these where they happen, so its aedes error listeners skip them.
 */
export class AccessDeniedError extends Error {
  readonly returnCode: AuthenticateError['returnCode'];

  constructor(message: string, returnCode: 2 | 4 | 5 = NOT_AUTHORIZED) {
    super(message);
    this.name = 'AccessDeniedError';
    this.returnCode = returnCode;
  }
}

/** Normalizes a hex serial number for comparison. */
export function normalizeSerial(hex: string): string {
  return hex.toLowerCase().replace(/^0+(?=.)/, '');
}

/**
 * Reads the fleet identity of a TLS peer whose certificate the TLS layer
 * verified. `identified` is set when the certificate carries exactly one.
 */
export function identifyPeerCertificate(socket: TLSSocket): {
  identified?: Identified;
  subject?: string;
  identityCount: number;
} {
  const certificate = socket.getPeerX509Certificate();
  if (certificate === undefined) return { identityCount: 0 };
  const identities = identitiesOfCertificate(certificate.raw);
  if (identities.length !== 1) {
    return {
      subject: certificate.subject,
      identityCount: identities.length,
    };
  }
  return {
    identified: {
      identity: identities[0],
      method: 'certificate',
      certificateSerial: normalizeSerial(certificate.serialNumber),
    },
    subject: certificate.subject,
    identityCount: 1,
  };
}
