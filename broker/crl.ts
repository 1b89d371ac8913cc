/** Reading a certificate revocation list (CRL) for the broker's checks. */
// @peculiar/x509 resolves its services through tsyringe, which needs the
// Reflect metadata API, so the polyfill loads first.
import 'reflect-metadata';
import { PemConverter, X509Crl } from '@peculiar/x509';
import { ErrorCode, FleetError } from '../protocol/index.ts';
import { normalizeSerial } from './identity.ts';

/** The parts of a CRL that the broker uses. */
export interface RevocationList {
  /** Revoked serial numbers, lower-case hex without leading zeros. */
  revokedSerials: Set<string>;
  /** Issue time of the CRL. */
  thisUpdate: Date;
  /**
   * Time by which the CA promised a newer CRL. OpenSSL rejects every
   * client certificate of that CA once it has passed.
   */
  nextUpdate: Date | undefined;
}

/**
 * Parses a PEM or DER CRL.
 *
 * @throws {FleetError} INVALID_CONFIG naming `source` when it is not a CRL.
 */
export function parseRevocationList(
  contents: Buffer,
  source: string,
): RevocationList {
  let crl: X509Crl;
  try {
    const text = contents.toString('latin1');
    // The PEM label OpenSSL writes and reads is "X509 CRL", which the
    // X509Crl constructor does not accept, so the DER is decoded first.
    const der = text.includes('-----BEGIN')
      ? PemConverter.decode(text)[0]
      : new Uint8Array(contents);
    crl = new X509Crl(der);
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `CRL file ${source} is not a PEM or DER certificate revocation list`,
      { cause: err },
    );
  }
  return {
    revokedSerials: new Set(
      crl.entries.map((entry) => normalizeSerial(entry.serialNumber)),
    ),
    thisUpdate: crl.thisUpdate,
    nextUpdate: crl.nextUpdate,
  };
}
