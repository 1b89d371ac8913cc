/**
 * Command line of the MQTT broker:
 * `npx tsx broker/main.ts --port 1883 --host 127.0.0.1`.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { createLogger } from '../protocol/index.ts';
import { startBroker } from './broker.ts';

function parsePort(text: string): number {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 0 || value > 65535) {
    throw new InvalidArgumentError(`expected a port in 0-65535, got ${text}`);
  }
  return value;
}

const program = new Command('broker')
  .description('Run the fleetlearn MQTT 3.1.1 broker (aedes) on TCP.')
  .option('--port <port>', 'TCP port, 0 for any free port', parsePort, 1883)
  .option('--host <address>', 'interface to listen on', '127.0.0.1')
  .addOption(
    new Option('--log-level <level>', 'pino log level')
      .choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
      .default('info'),
  );

program.parse();
const flags = program.opts<{ port: number; host: string; logLevel: string }>();
const log = createLogger({ level: flags.logLevel });

try {
  const broker = await startBroker({
    port: flags.port,
    host: flags.host,
    log,
  });
  let stopping = false;
  const stop = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'shutting down');
    broker.close().then(
      () => process.exit(0),
      (err: unknown) => {
        log.error({ err }, 'broker shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
} catch (err) {
  log.fatal(
    { err, host: flags.host, port: flags.port },
    'broker failed to start',
  );
  process.exitCode = 1;
}
