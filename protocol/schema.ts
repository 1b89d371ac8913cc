import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';

const PROTO_PATH = fileURLToPath(
  new URL('./fleetlearn_v1.proto', import.meta.url),
);

// keepCase stays off: fields are camelCase in TypeScript (update_id becomes
// updateId). The codecs below depend on that choice.
const root = protobuf.loadSync(PROTO_PATH);

function lookup(name: string): protobuf.Type {
  return root.lookupType(`fleetlearn.v1.${name}`);
}

/** protobufjs types of the fleetlearn.v1 package. */
export const schema = {
  Tensor: lookup('Tensor'),
  RoundTask: lookup('RoundTask'),
  ModelUpdate: lookup('ModelUpdate'),
  UpdateAck: lookup('UpdateAck'),
  ModelRelease: lookup('ModelRelease'),
  SignedRelease: lookup('SignedRelease'),
  SignedUpdate: lookup('SignedUpdate'),
  ReleaseChunk: lookup('ReleaseChunk'),
  VehicleStatus: lookup('VehicleStatus'),
  ModelWeights: lookup('ModelWeights'),
  VehicleReport: lookup('VehicleReport'),
  PartialAggregate: lookup('PartialAggregate'),
};

/** Numeric values of the TensorEncoding enum. */
export const TensorEncoding = {
  Unspecified: 0,
  Float32: 1,
  Float16: 2,
  Int8Scaled: 3,
  TopkSparse: 4,
} as const;

/** Numeric values of the AckStatus enum. */
export const AckStatus = { Unspecified: 0, Accepted: 1, Rejected: 2 } as const;

/** Numeric values of the VehicleState enum. */
export const VehicleState = {
  Unspecified: 0,
  Online: 1,
  Training: 2,
  Offline: 3,
} as const;

/** Numeric values of the CandidateRollout.State enum. */
export const CandidateState = {
  Unspecified: 0,
  Active: 1,
  Withdrawn: 2,
  Promoted: 3,
} as const;

/** Numeric values of the VersionReport.Role enum. */
export const VersionRole = {
  Unspecified: 0,
  Serving: 1,
  Previous: 2,
  Shadow: 3,
} as const;
