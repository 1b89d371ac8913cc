import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { describe, test } from 'node:test';
import { connect, type MqttClient } from 'mqtt';
import { startBroker } from '../broker/index.ts';
import { createLogger } from '../protocol/index.ts';
import { endClient } from '../protocol/mqtt-end.ts';

const log = createLogger({ level: 'silent' });
const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));

function connectClient(port: number, clientId: string): Promise<MqttClient> {
  const client = connect(`mqtt://127.0.0.1:${port}`, {
    protocolVersion: 4,
    clientId,
    reconnectPeriod: 0,
  });
  return new Promise((resolve, reject) => {
    client.once('connect', () => resolve(client));
    client.once('error', reject);
  });
}

describe('startBroker', () => {
  test('port 0 picks a free port', async () => {
    const broker = await startBroker({ port: 0, log });

    assert.ok(broker.port > 0);
    assert.equal(broker.host, '127.0.0.1');

    await broker.close();
  });

  test('delivers retained message to late subscriber', async () => {
    const broker = await startBroker({ port: 0, log });
    const publisher = await connectClient(broker.port, 'publisher');
    await publisher.publishAsync('fleet/v1/t/releases/current', 'v1', {
      qos: 1,
      retain: true,
    });

    const subscriber = await connectClient(broker.port, 'subscriber');
    const received = new Promise<{ payload: string; retain: boolean }>(
      (resolve) => {
        subscriber.on('message', (_topic, payload, packet) =>
          resolve({ payload: payload.toString(), retain: packet.retain }),
        );
      },
    );
    await subscriber.subscribeAsync('fleet/v1/t/releases/current', { qos: 1 });

    assert.deepEqual(await received, { payload: 'v1', retain: true });

    await endClient(publisher, 2000);
    await endClient(subscriber, 2000);
    await broker.close();
  });

  test('close disconnects clients and stops listening', async () => {
    const broker = await startBroker({ port: 0, log });
    const client = await connectClient(broker.port, 'to-be-closed');
    const closed = new Promise<void>((resolve) =>
      client.once('close', () => resolve()),
    );

    await broker.close();
    await closed;
    await broker.close();

    await assert.rejects(
      connectClient(broker.port, 'after-close'),
      (err: unknown) => {
        return err instanceof Error && /ECONNREFUSED/.test(err.message);
      },
    );
    await client.endAsync(true);
  });

  test('invalid port rejected', async () => {
    await assert.rejects(startBroker({ port: 70000, log }), RangeError);
    await assert.rejects(startBroker({ port: -1, log }), RangeError);
  });

  test('busy port fails to start', async () => {
    const first = await startBroker({ port: 0, log });

    await assert.rejects(
      startBroker({ port: first.port, log }),
      (err: unknown) => (err as NodeJS.ErrnoException).code === 'EADDRINUSE',
    );

    await first.close();
  });
});

describe('broker command line', () => {
  test('sigterm stops with exit 0', async () => {
    const child = spawn(
      process.execPath,
      ['--import', 'tsx', 'broker/main.ts', '--port', '0'],
      { cwd: REPOSITORY_ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let output = '';
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    const exited = once(child, 'exit');

    const started = await new Promise<{ port: number }>((resolve, reject) => {
      child.once('exit', () => reject(new Error(`broker exited: ${output}`)));
      child.stdout.on('data', (chunk: Buffer) => {
        output += chunk.toString();
        const line = output
          .split('\n')
          .find((text) => text.includes('broker started'));
        if (line !== undefined) resolve(JSON.parse(line));
      });
    });
    const client = await connectClient(started.port, 'cli-client');
    child.kill('SIGTERM');
    const [code, signal] = await exited;

    assert.equal(code, 0, output);
    assert.equal(signal, null);
    assert.match(output, /broker stopped/);
    await client.endAsync(true);
  });
});
