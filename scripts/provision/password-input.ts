/** Reading a password from standard input without echoing it. */

/** Reads the first line of a piped standard input. */
async function readPipedLine(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8').split(/\r?\n/)[0];
}

/** Reads one line from the terminal in raw mode, so nothing is echoed. */
function readHiddenLine(prompt: string): Promise<string> {
  const stdin = process.stdin;
  process.stderr.write(prompt);
  stdin.setRawMode(true);
  stdin.resume();
  let text = '';
  return new Promise((resolve, reject) => {
    const finish = (error?: Error): void => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write('\n');
      if (error === undefined) resolve(text);
      else reject(error);
    };
    const onData = (chunk: Buffer): void => {
      for (const character of chunk.toString('utf8')) {
        if (character === '\r' || character === '\n') return finish();
        if (character === '\u0003') {
          return finish(new Error('password entry interrupted'));
        }
        if (character === '\u007f' || character === '\b') {
          text = text.slice(0, -1);
        } else {
          text += character;
        }
      }
    };
    stdin.on('data', onData);
  });
}

/**
 * Reads a password: hidden from the terminal, or the first line of a pipe
 * (`printf '%s\n' "$PASSWORD" | npm run provision -- add-user ...`).
 */
export function readPassword(prompt: string): Promise<string> {
  return process.stdin.isTTY ? readHiddenLine(prompt) : readPipedLine();
}
