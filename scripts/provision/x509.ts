/**
 * @peculiar/x509 set up for Node: the Reflect metadata polyfill that its
 * dependency tsyringe needs loads first, and signing uses Node's WebCrypto.
 */
import 'reflect-metadata';
import { webcrypto } from 'node:crypto';
import * as x509 from '@peculiar/x509';

x509.cryptoProvider.set(webcrypto as unknown as Crypto);

export { x509 };

/** Key algorithm of every fleet key: ECDSA on P-256. */
export const KEY_ALGORITHM = { name: 'ECDSA', namedCurve: 'P-256' } as const;
/** Signature algorithm of certificates and CRLs: ECDSA with SHA-256. */
export const SIGNING_ALGORITHM = { name: 'ECDSA', hash: 'SHA-256' } as const;
