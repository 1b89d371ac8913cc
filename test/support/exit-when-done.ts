/**
 * Loaded with --import into every test file's process, so that no test
 * file can keep the whole run waiting:
 *
 * - once a file's tests have finished, a handle that a test left open (a
 *   socket or a reconnect timer) gets GRACE_MS, then the process exits;
 * - a file that is still running after FILE_LIMIT_MS (a hook or a test
 *   that never settles) prints the resources it waits on and fails.
 *
 * Both timers are unref'd, so they never delay a process that exits by
 * itself.
 */
import { after } from 'node:test';

const GRACE_MS = 10_000;
const FILE_LIMIT_MS = 10 * 60_000;

after(() => {
  setTimeout(() => {
    console.error(
      `test process still running ${GRACE_MS} ms after its tests ended, ` +
        'exiting: a test left a handle open',
    );
    process.exit(process.exitCode ?? 0);
  }, GRACE_MS).unref();
});

setTimeout(() => {
  console.error(
    `test file ${process.argv[1]} still running after ${FILE_LIMIT_MS} ms, ` +
      `failing it; open resources: ${process.getActiveResourcesInfo().join(', ')}`,
  );
  process.exit(1);
}, FILE_LIMIT_MS).unref();
