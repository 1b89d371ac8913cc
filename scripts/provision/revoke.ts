/** Revoking issued certificates. */
import { ErrorCode, FleetError } from '../../protocol/index.ts';
import {
  normalizeSerialHex,
  writeCrl,
  type CertificateRole,
  type FleetAuthority,
  type IssuedCertificate,
  type RevocationReason,
} from './authority.ts';

/**
 * Revocation target: every live certificate of a vehicle or role, or one
 * serial number.
 */
export type RevocationTarget =
  | { vehicleId: string }
  | { role: Exclude<CertificateRole, 'vehicle'> }
  | { serial: string };

function describe(target: RevocationTarget): string {
  if ('vehicleId' in target) return `vehicle ${target.vehicleId}`;
  if ('role' in target) return `the ${target.role}`;
  return `serial ${target.serial}`;
}

function matches(entry: IssuedCertificate, target: RevocationTarget): boolean {
  if ('vehicleId' in target) {
    return entry.role === 'vehicle' && entry.name === target.vehicleId;
  }
  if ('role' in target) return entry.role === target.role;
  return normalizeSerialHex(entry.serial) === normalizeSerialHex(target.serial);
}

/**
 * Marks every matching certificate that is not revoked yet as revoked and
 * writes a new CRL. Returns the revoked entries. The broker applies the
 * CRL after a restart or a credentials reload (SIGHUP).
 *
 * @throws {FleetError} INVALID_CONFIG when no live certificate matches.
 */
export async function revokeCertificates(
  authority: FleetAuthority,
  target: RevocationTarget,
  reason: RevocationReason = 'unspecified',
): Promise<IssuedCertificate[]> {
  const revokedAt = new Date().toISOString();
  const revoked = authority.state.certificates.filter(
    (entry) => entry.revokedAt === undefined && matches(entry, target),
  );
  if (revoked.length === 0) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `no certificate of ${describe(target)} is issued and not revoked`,
    );
  }
  for (const entry of revoked) {
    entry.revokedAt = revokedAt;
    entry.revocationReason = reason;
  }
  await writeCrl(authority);
  return revoked;
}
