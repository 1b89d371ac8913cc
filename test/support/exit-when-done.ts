/**
 * Loaded with --import into every test file's process. Once a file's
 * tests have finished, a handle that a test left open (a socket or a
 * reconnect timer) must not keep the process, and with it the whole test
 * run, waiting forever. The timer is unref'd, so it never delays a
 * process that exits by itself.
 */
import { after } from 'node:test';

const GRACE_MS = 10_000;

after(() => {
  setTimeout(() => {
    console.error(
      `test process still running ${GRACE_MS} ms after its tests ended, ` +
        'exiting: a test left a handle open',
    );
    process.exit(process.exitCode ?? 0);
  }, GRACE_MS).unref();
});
