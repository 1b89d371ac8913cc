import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { createRandom } from '../models/index.ts';
import { ErrorCode, FleetError } from '../protocol/index.ts';
import {
  SecAggServer,
  SecAggVehicle,
  createQuantization,
  dequantizeSum,
  quantize,
  runSecureRound,
} from '../secure-aggregation/index.ts';
import type {
  EncryptedShare,
  UnmaskRequest,
} from '../secure-aggregation/index.ts';

const SEED = 7001;
const CLIP_BOUND = 0.5;

function vehicleIds(count: number): string[] {
  return Array.from(
    { length: count },
    (_, i) => `veh-${String(i).padStart(3, '0')}`,
  );
}

function randomUpdates(count: number, length: number, seed: number) {
  const random = createRandom(seed);
  return Array.from({ length: count }, () =>
    Float32Array.from({ length }, () => (2 * random() - 1) * CLIP_BOUND),
  );
}

function plainSum(updates: Float32Array[], indices: number[]): Float64Array {
  const sum = new Float64Array(updates[0].length);
  for (const v of indices) {
    for (let i = 0; i < sum.length; i++) sum[i] += updates[v][i];
  }
  return sum;
}

function maxAbsDifference(a: Float64Array, b: Float64Array): number {
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
  return max;
}

function hasCode(code: string) {
  return (err: unknown) => err instanceof FleetError && err.code === code;
}

describe('runSecureRound', () => {
  test('ten vehicles match plain sum', () => {
    const ids = vehicleIds(10);
    const updates = randomUpdates(10, 2_000, SEED);

    const result = runSecureRound({
      vehicles: ids,
      updates,
      threshold: 6,
      clipBound: CLIP_BOUND,
    });

    const plain = plainSum(
      updates,
      ids.map((_, v) => v),
    );
    const error = maxAbsDifference(result.sum, plain);
    // Deterministic rounding: at most step / 2 per vehicle, so the mean
    // (equal-weight FedAvg) is within half a quantization step.
    assert.ok(
      error / 10 <= result.quantization.step / 2,
      `mean error ${error / 10}, step ${result.quantization.step}`,
    );
    assert.deepEqual(result.aggregate.survivorIds, ids);
    assert.deepEqual(result.aggregate.droppedIds, []);
  });

  test('two drop after key agreement', () => {
    const ids = vehicleIds(10);
    const updates = randomUpdates(10, 2_000, SEED + 1);
    const dropped = [ids[2], ids[7]];

    const result = runSecureRound({
      vehicles: ids,
      updates,
      threshold: 6,
      clipBound: CLIP_BOUND,
      dropAfterKeyAgreement: dropped,
    });

    const survivors = ids.filter((id) => !dropped.includes(id));
    const plain = plainSum(
      updates,
      survivors.map((id) => ids.indexOf(id)),
    );
    const error = maxAbsDifference(result.sum, plain);
    assert.ok(error / 8 <= result.quantization.step / 2, `error ${error}`);
    assert.deepEqual(result.aggregate.droppedIds, dropped);
    assert.deepEqual(result.aggregate.survivorIds, survivors);
    assert.equal(result.serverView.maskedInputs.length, 8);
    // 10 vehicles each sent one encrypted share to each of 9 others.
    assert.equal(result.serverView.encryptedShares.length, 90);
  });

  test('one drops after masked input', () => {
    const ids = vehicleIds(10);
    const updates = randomUpdates(10, 2_000, SEED + 2);

    const result = runSecureRound({
      vehicles: ids,
      updates,
      threshold: 6,
      clipBound: CLIP_BOUND,
      rounding: 'stochastic',
      dropAfterMaskedInput: [ids[4]],
    });

    // Its input arrived, so it is in the sum; its self mask came back
    // from the other survivors' shares.
    const plain = plainSum(
      updates,
      ids.map((_, v) => v),
    );
    const error = maxAbsDifference(result.sum, plain);
    assert.ok(error / 10 < result.quantization.step, `error ${error}`);
    assert.deepEqual(result.aggregate.survivorIds, ids);
    assert.equal(result.aggregate.responderIds.length, 9);
    assert.ok(!result.aggregate.responderIds.includes(ids[4]));
  });

  test('dropouts in every phase', () => {
    const ids = vehicleIds(10);
    const updates = randomUpdates(10, 500, SEED + 3);

    const result = runSecureRound({
      vehicles: ids,
      updates,
      threshold: 5,
      clipBound: CLIP_BOUND,
      dropAfterAdvertise: [ids[0]],
      dropAfterKeyAgreement: [ids[5], ids[9]],
      dropAfterMaskedInput: [ids[3]],
    });

    const survivors = [1, 2, 3, 4, 6, 7, 8];
    const error = maxAbsDifference(result.sum, plainSum(updates, survivors));
    assert.ok(error / 7 <= result.quantization.step / 2, `error ${error}`);
    assert.deepEqual(result.aggregate.droppedIds, [ids[5], ids[9]]);
    assert.equal(result.aggregate.responderIds.length, 6);
  });

  test('reveals one secret kind per vehicle', () => {
    const ids = vehicleIds(10);
    const dropped = [ids[1], ids[8]];

    const result = runSecureRound({
      vehicles: ids,
      updates: randomUpdates(10, 100, SEED + 4),
      threshold: 6,
      clipBound: CLIP_BOUND,
      dropAfterKeyAgreement: dropped,
    });

    for (const response of result.serverView.unmaskResponses) {
      const selfOwners = response.selfMaskShares.map((item) => item.ownerId);
      const keyOwners = response.maskKeyShares.map((item) => item.ownerId);
      assert.deepEqual(keyOwners, dropped);
      assert.deepEqual(selfOwners, result.aggregate.survivorIds);
      assert.ok(selfOwners.every((id) => !keyOwners.includes(id)));
    }
  });

  test('fewer than t inputs fail', () => {
    const ids = vehicleIds(6);

    assert.throws(
      () =>
        runSecureRound({
          vehicles: ids,
          updates: randomUpdates(6, 50, SEED + 5),
          threshold: 5,
          clipBound: CLIP_BOUND,
          dropAfterKeyAgreement: [ids[0], ids[1]],
        }),
      hasCode(ErrorCode.QuorumNotMet),
    );
  });

  test('fewer than t responders fail', () => {
    const ids = vehicleIds(6);

    assert.throws(
      () =>
        runSecureRound({
          vehicles: ids,
          updates: randomUpdates(6, 50, SEED + 6),
          threshold: 5,
          clipBound: CLIP_BOUND,
          dropAfterMaskedInput: [ids[2], ids[3]],
        }),
      hasCode(ErrorCode.QuorumNotMet),
    );
  });

  test('fewer than t advertisers fail', () => {
    assert.throws(
      () =>
        runSecureRound({
          vehicles: vehicleIds(3),
          updates: randomUpdates(3, 50, SEED + 7),
          threshold: 4,
          clipBound: CLIP_BOUND,
        }),
      hasCode(ErrorCode.QuorumNotMet),
    );
  });

  test('rejects inconsistent options', () => {
    const ids = vehicleIds(3);
    const updates = randomUpdates(3, 10, SEED + 8);
    const base = { vehicles: ids, updates, threshold: 2, clipBound: 0.5 };

    assert.throws(() => runSecureRound({ ...base, threshold: 1 }), RangeError);
    assert.throws(
      () => runSecureRound({ ...base, updates: updates.slice(1) }),
      RangeError,
    );
    assert.throws(
      () =>
        runSecureRound({
          ...base,
          dropAfterAdvertise: [ids[0]],
          dropAfterMaskedInput: [ids[0]],
        }),
      RangeError,
    );
  });
});

interface ManualRound {
  server: SecAggServer;
  clients: SecAggVehicle[];
  routed: Map<string, EncryptedShare[]>;
}

/** Runs phases 0 and 1 by hand for `count` vehicles. */
function shareKeysByHand(
  count: number,
  threshold: number,
  length: number,
): ManualRound {
  const roundId = 'manual-round';
  const server = new SecAggServer({ roundId, threshold, vectorLength: length });
  const clients = vehicleIds(count).map(
    (vehicleId) => new SecAggVehicle({ vehicleId, roundId, threshold }),
  );
  for (const client of clients)
    server.receiveAdvertisement(client.advertiseKeys());
  const advertisements = server.closeAdvertising();
  for (const client of clients) {
    server.receiveShares(client.vehicleId, client.shareKeys(advertisements));
  }
  return { server, clients, routed: server.closeSharing() };
}

function maskAll(round: ManualRound, length: number): UnmaskRequest {
  for (const client of round.clients) {
    const words = new Uint32Array(length).fill(1);
    const input = client.maskInput(round.routed.get(client.vehicleId)!, words);
    round.server.receiveMaskedInput(input);
  }
  return round.server.closeMaskedInput();
}

describe('SecAggVehicle', () => {
  test('tampered share fails authentication', () => {
    const round = shareKeysByHand(4, 3, 16);
    const target = round.clients[1];
    const shares = round.routed.get(target.vehicleId)!;

    shares[0].ciphertext[3] ^= 0x80;

    assert.throws(
      () => target.maskInput(shares, new Uint32Array(16)),
      hasCode(ErrorCode.DigestMismatch),
    );
  });

  test('rejects vehicle in both lists', () => {
    const round = shareKeysByHand(4, 3, 16);
    const request = maskAll(round, 16);
    const [first, second] = round.clients;

    const both = { ...request, droppedIds: [second.vehicleId] };

    assert.throws(
      () => first.unmask(both),
      hasCode(ErrorCode.MalformedPayload),
    );
  });

  test('answers only one unmask request', () => {
    const round = shareKeysByHand(4, 3, 16);
    const request = maskAll(round, 16);
    const [first, second] = round.clients;

    first.unmask(request);
    // A server that first learned b_v now requests the mask key of v.
    const flipped: UnmaskRequest = {
      ...request,
      survivorIds: request.survivorIds.filter((id) => id !== second.vehicleId),
      droppedIds: [second.vehicleId],
    };

    assert.throws(
      () => first.unmask(flipped),
      hasCode(ErrorCode.MalformedPayload),
    );
  });

  test('rejects request not splitting U2', () => {
    const round = shareKeysByHand(7, 3, 16);
    const request = maskAll(round, 16);
    const ids = request.survivorIds;

    const cases: Array<(responderId: string) => UnmaskRequest> = [
      () => ({ ...request, survivorIds: ids.slice(0, 6) }),
      () => ({ ...request, survivorIds: [...ids, 'veh-999'] }),
      () => ({ ...request, survivorIds: [...ids, ids[1]] }),
      (responderId) => ({
        ...request,
        survivorIds: ids.filter((id) => id !== responderId),
        droppedIds: [responderId],
      }),
      () => ({ ...request, roundId: 'other-round' }),
    ];

    cases.forEach((makeRequest, i) => {
      const client = round.clients[i];
      assert.throws(
        () => client.unmask(makeRequest(client.vehicleId)),
        hasCode(ErrorCode.MalformedPayload),
        `case ${i}`,
      );
    });
    assert.doesNotThrow(() => round.clients[6].unmask(request));
  });

  test('rejected request aborts vehicle', () => {
    const round = shareKeysByHand(4, 3, 16);
    const request = maskAll(round, 16);
    const [first, second] = round.clients;

    assert.throws(
      () => first.unmask({ ...request, droppedIds: [second.vehicleId] }),
      hasCode(ErrorCode.MalformedPayload),
    );

    assert.throws(
      () => first.unmask(request),
      hasCode(ErrorCode.MalformedPayload),
    );
  });

  test('rejects too few survivors', () => {
    const round = shareKeysByHand(4, 3, 16);
    const request = maskAll(round, 16);
    const [first] = round.clients;
    const ids = request.survivorIds;

    const fewer = {
      ...request,
      survivorIds: ids.slice(0, 2),
      droppedIds: ids.slice(2),
    };

    assert.throws(() => first.unmask(fewer), hasCode(ErrorCode.QuorumNotMet));
  });
});

describe('SecAggServer', () => {
  test('rejects foreign and repeated messages', () => {
    const round = shareKeysByHand(3, 2, 8);
    const [first, second] = round.clients;
    const input = first.maskInput(
      round.routed.get(first.vehicleId)!,
      new Uint32Array(8),
    );
    const { server } = round;

    server.receiveMaskedInput(input);

    assert.throws(
      () => server.receiveMaskedInput(input),
      hasCode(ErrorCode.DuplicateUpdate),
    );
    assert.throws(
      () => server.receiveMaskedInput({ ...input, roundId: 'r0' }),
      hasCode(ErrorCode.WrongRound),
    );
    assert.throws(
      () => server.receiveMaskedInput({ ...input, vehicleId: 'veh-999' }),
      hasCode(ErrorCode.VehicleNotSelected),
    );
    const short = second.maskInput(
      round.routed.get(second.vehicleId)!,
      new Uint32Array(4),
    );
    assert.throws(
      () => server.receiveMaskedInput(short),
      hasCode(ErrorCode.WrongShape),
    );
  });

  test('rejects messages out of phase', () => {
    const round = shareKeysByHand(3, 2, 8);
    const request = maskAll(round, 8);
    const late = new SecAggVehicle({
      vehicleId: 'veh-late',
      roundId: 'manual-round',
      threshold: 2,
    });

    assert.throws(
      () => round.server.receiveAdvertisement(late.advertiseKeys()),
      hasCode(ErrorCode.MalformedPayload),
    );
    assert.throws(() => round.server.finish(), hasCode(ErrorCode.QuorumNotMet));
    assert.equal(request.survivorIds.length, 3);
  });

  test('rejects incomplete share list', () => {
    const server = new SecAggServer({
      roundId: 'r1',
      threshold: 2,
      vectorLength: 4,
    });
    const clients = ['veh-a', 'veh-b', 'veh-c'].map(
      (vehicleId) =>
        new SecAggVehicle({ vehicleId, roundId: 'r1', threshold: 2 }),
    );
    for (const client of clients)
      server.receiveAdvertisement(client.advertiseKeys());
    const advertisements = server.closeAdvertising();
    const shares = clients[0].shareKeys(advertisements);

    assert.throws(
      () => server.receiveShares('veh-a', shares.slice(1)),
      hasCode(ErrorCode.MalformedPayload),
    );
    assert.throws(
      () => server.receiveShares('veh-a', [shares[0], shares[0]]),
      hasCode(ErrorCode.MalformedPayload),
    );
    assert.doesNotThrow(() => server.receiveShares('veh-a', shares));
  });

  test('rejects copied public key', () => {
    const server = new SecAggServer({
      roundId: 'r1',
      threshold: 2,
      vectorLength: 4,
    });
    const clients = ['veh-a', 'veh-b', 'veh-c'].map(
      (vehicleId) =>
        new SecAggVehicle({ vehicleId, roundId: 'r1', threshold: 2 }),
    );
    const [first, second, third] = clients.map((c) => c.advertiseKeys());
    server.receiveAdvertisement(first);

    const copy = { ...second, maskPublicKey: first.maskPublicKey };

    assert.throws(
      () => server.receiveAdvertisement(copy),
      hasCode(ErrorCode.MalformedPayload),
    );
    server.receiveAdvertisement(third);
    assert.equal(server.closeAdvertising().length, 2);
  });

  test('vehicle rejects altered own keys', () => {
    const clients = ['veh-a', 'veh-b', 'veh-c'].map(
      (vehicleId) =>
        new SecAggVehicle({ vehicleId, roundId: 'r1', threshold: 2 }),
    );
    const advertisements = clients.map((c) => c.advertiseKeys());
    const substitute = new SecAggVehicle({
      vehicleId: 'veh-a',
      roundId: 'r1',
      threshold: 2,
    });

    // A man in the middle replaces veh-a's keys in the broadcast list.
    const altered = [substitute.advertiseKeys(), ...advertisements.slice(1)];

    assert.throws(
      () => clients[0].shareKeys(altered),
      hasCode(ErrorCode.MalformedPayload),
    );
  });

  test('rejects unselected vehicle', () => {
    const server = new SecAggServer({
      roundId: 'r1',
      threshold: 2,
      vectorLength: 4,
      vehicleIds: ['veh-a', 'veh-b'],
    });
    const stranger = new SecAggVehicle({
      vehicleId: 'veh-x',
      roundId: 'r1',
      threshold: 2,
    });

    assert.throws(
      () => server.receiveAdvertisement(stranger.advertiseKeys()),
      hasCode(ErrorCode.VehicleNotSelected),
    );
  });
});

describe('SecAggServer unmasking', () => {
  test('wrong mask key share detected', () => {
    const round = shareKeysByHand(5, 3, 8);
    const dropped = round.clients[4];
    for (const client of round.clients.slice(0, 4)) {
      const words = new Uint32Array(8);
      const shares = round.routed.get(client.vehicleId)!;
      round.server.receiveMaskedInput(client.maskInput(shares, words));
    }
    const request = round.server.closeMaskedInput();

    const responses = round.clients.slice(0, 3).map((c) => c.unmask(request));
    responses[1].maskKeyShares[0].share.y += 1n;
    for (const response of responses) {
      round.server.receiveUnmaskResponse(response);
    }

    assert.deepEqual(request.droppedIds, [dropped.vehicleId]);
    assert.throws(
      () => round.server.finish(),
      hasCode(ErrorCode.MalformedPayload),
    );
  });

  test('wrong self-mask share detected', () => {
    const round = shareKeysByHand(5, 3, 8);
    const request = maskAll(round, 8);

    const responses = round.clients.map((c) => c.unmask(request));
    responses[0].selfMaskShares[2].share.y += 1n;
    for (const response of responses) {
      round.server.receiveUnmaskResponse(response);
    }

    assert.throws(
      () => round.server.finish(),
      hasCode(ErrorCode.MalformedPayload),
    );
  });
});

describe('model-sized round', () => {
  // dense1 (1024 x 128 + 128) and dense2 (128 x 43 + 43): 136,747 weights.
  const TRAINABLE_WEIGHTS = 1024 * 128 + 128 + 128 * 43 + 43;

  test('ten vehicles with 137k weights', (t) => {
    const count = 10;
    const round = shareKeysByHandTimed(count, 6, TRAINABLE_WEIGHTS);
    const updates = randomUpdates(count, TRAINABLE_WEIGHTS, SEED + 9);
    const quantization = createQuantization(CLIP_BOUND, count);
    const dropped = new Set([
      round.clients[3].vehicleId,
      round.clients[6].vehicleId,
    ]);

    let maskMs = 0;
    round.clients.forEach((client, v) => {
      if (dropped.has(client.vehicleId)) return;
      const start = performance.now();
      const words = quantize(updates[v], quantization);
      const input = client.maskInput(
        round.routed.get(client.vehicleId)!,
        words,
      );
      maskMs += performance.now() - start;
      round.server.receiveMaskedInput(input);
    });
    const request = round.server.closeMaskedInput();
    for (const client of round.clients) {
      if (!dropped.has(client.vehicleId)) {
        round.server.receiveUnmaskResponse(client.unmask(request));
      }
    }
    const start = performance.now();
    const aggregate = round.server.finish();
    const unmaskMs = performance.now() - start;
    const sum = dequantizeSum(aggregate.sumWords, quantization, 8);

    t.diagnostic(
      `keys and shares per vehicle: ${(round.shareMs / count).toFixed(1)} ms`,
    );
    t.diagnostic(
      `quantize and mask per vehicle: ${(maskMs / 8).toFixed(1)} ms`,
    );
    t.diagnostic(`server unmasking, 2 dropped: ${unmaskMs.toFixed(1)} ms`);
    const survivors = [0, 1, 2, 4, 5, 7, 8, 9];
    const error = maxAbsDifference(sum, plainSum(updates, survivors));
    assert.ok(error / 8 <= quantization.step / 2, `error ${error}`);
  });
});

function shareKeysByHandTimed(
  count: number,
  threshold: number,
  length: number,
) {
  const start = performance.now();
  const round = shareKeysByHand(count, threshold, length);
  return { ...round, shareMs: performance.now() - start };
}
