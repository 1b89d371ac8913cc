/**
 * One-line reasons for file system errors, so that the registry command
 * reports a failed read or write as one line that names the path instead
 * of a Node.js stack.
 */
import { ErrorCode, FleetError } from '../../protocol/index.ts';

/**
 * Returns the reason of a file system error as one line, such as
 * "ENOENT: no such file or directory", without the syscall and path that
 * Node.js appends. Any other error gives its message with line breaks
 * replaced by spaces.
 */
export function describeFileError(err: unknown): string {
  const error = err as Partial<NodeJS.ErrnoException> | null;
  const message = String(error?.message ?? err);
  const syscallAt =
    typeof error?.syscall === 'string'
      ? message.indexOf(`, ${error.syscall}`)
      : -1;
  const reason = syscallAt > 0 ? message.slice(0, syscallAt) : message;
  return oneLine(reason);
}

/** Replaces each line break, with the spaces around it, by one space. */
export function oneLine(text: string): string {
  return text.replace(/\s*[\r\n]+\s*/g, ' ').trim();
}

/**
 * Wraps a failed read of `file` in a FleetError whose message names the
 * kind of file (such as "manifest"), the path and the reason.
 */
export function fileReadError(
  code: ErrorCode,
  fileKind: string,
  file: string,
  err: unknown,
): FleetError {
  return new FleetError(
    code,
    `cannot read ${fileKind} ${file}: ${describeFileError(err)}`,
    { cause: err },
  );
}

/**
 * Wraps a failure to decode the signed release notice `file` in a
 * MALFORMED_PAYLOAD FleetError that names the file.
 */
export function damagedNotice(file: string, err: unknown): FleetError {
  const reason = oneLine(String((err as Error)?.message ?? err));
  return new FleetError(
    ErrorCode.MalformedPayload,
    `signed notice ${file} does not decode: ${reason}`,
    { cause: err },
  );
}
