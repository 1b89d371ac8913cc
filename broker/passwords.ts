/**
 * Username and password identities for development: a JSON users file
 * with a salted scrypt hash per user, never the password itself.
 */
import {
  randomBytes,
  scrypt,
  timingSafeEqual,
  type ScryptOptions,
} from 'node:crypto';
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import {
  ErrorCode,
  FleetError,
  formatIdentityUri,
  type FleetIdentity,
} from '../protocol/index.ts';

/** One user of the users file. */
export interface PasswordUser {
  username: string;
  identity: FleetIdentity;
  /** Base64 salt, 16 random bytes. */
  salt: string;
  /** Base64 scrypt output of the password and salt. */
  hash: string;
  /** scrypt cost parameters the hash was made with. */
  scrypt: { N: number; r: number; p: number; keyLength: number };
}

/** Contents of a users file. */
export interface UsersFile {
  version: 1;
  users: PasswordUser[];
}

/**
 * scrypt cost of new hashes: N = 2^15, r = 8, p = 1 (about 32 MiB and a
 * few tens of milliseconds per hash), stored with each hash so that it can
 * change later.
 */
const DEFAULT_SCRYPT = { N: 1 << 15, r: 8, p: 1, keyLength: 32 };
/** Upper bound on N read from a file, so a file cannot exhaust memory. */
const MAX_SCRYPT_N = 1 << 20;

function deriveKey(
  password: string | Buffer,
  salt: Buffer,
  params: PasswordUser['scrypt'],
): Promise<Buffer> {
  const options: ScryptOptions = {
    N: params.N,
    r: params.r,
    p: params.p,
    maxmem: 256 * params.N * params.r + 1024 * 1024,
  };
  return new Promise((resolve, reject) => {
    scrypt(password, salt, params.keyLength, options, (err, key) =>
      err ? reject(err) : resolve(key),
    );
  });
}

/** Hashes `password` for `identity` with a new random salt. */
export async function createPasswordUser(
  username: string,
  password: string,
  identity: FleetIdentity,
): Promise<PasswordUser> {
  if (username.length === 0) throw new RangeError('username must not be empty');
  if (password.length < 8) {
    throw new RangeError(
      `password of user ${username} has ${password.length} characters, ` +
        'expected at least 8',
    );
  }
  formatIdentityUri(identity); // throws RangeError for invalid ids
  const salt = randomBytes(16);
  const key = await deriveKey(password, salt, DEFAULT_SCRYPT);
  return {
    username,
    identity: { ...identity },
    salt: salt.toString('base64'),
    hash: key.toString('base64'),
    scrypt: { ...DEFAULT_SCRYPT },
  };
}

/**
 * True when `password` matches the user's hash. The comparison takes the
 * same time for every wrong password of the same length as the hash.
 */
export async function verifyPassword(
  user: PasswordUser,
  password: string | Buffer,
): Promise<boolean> {
  const expected = Buffer.from(user.hash, 'base64');
  const key = await deriveKey(
    password,
    Buffer.from(user.salt, 'base64'),
    user.scrypt,
  );
  return key.length === expected.length && timingSafeEqual(key, expected);
}

function invalidFile(file: string, problem: string): FleetError {
  return new FleetError(
    ErrorCode.InvalidConfig,
    `users file ${file} ${problem}`,
  );
}

function checkUser(file: string, value: unknown, index: number): PasswordUser {
  const user = value as PasswordUser;
  const params = user?.scrypt;
  const valid =
    typeof user?.username === 'string' &&
    typeof user.salt === 'string' &&
    typeof user.hash === 'string' &&
    typeof user.identity === 'object' &&
    Number.isInteger(params?.N) &&
    params.N > 1 &&
    params.N <= MAX_SCRYPT_N &&
    Number.isInteger(params.r) &&
    Number.isInteger(params.p) &&
    Number.isInteger(params.keyLength);
  if (!valid) {
    throw invalidFile(file, `has an invalid entry at users[${index}]`);
  }
  try {
    formatIdentityUri(user.identity);
  } catch (err) {
    throw invalidFile(
      file,
      `has an invalid identity for user ${user.username}: ` +
        (err as Error).message,
    );
  }
  return user;
}

/**
 * Reads and checks a users file.
 *
 * @throws {FleetError} INVALID_CONFIG for an unreadable file, invalid JSON,
 *   an invalid entry or a username listed twice.
 */
export function readUsersFile(file: string): UsersFile {
  let parsed: { version?: unknown; users?: unknown };
  try {
    parsed = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `users file ${file} cannot be read as JSON: ${(err as Error).message}`,
      { cause: err },
    );
  }
  if (parsed?.version !== 1 || !Array.isArray(parsed.users)) {
    throw invalidFile(file, 'is not {"version": 1, "users": [...]}');
  }
  const users = parsed.users.map((user, index) => checkUser(file, user, index));
  const names = new Set<string>();
  for (const user of users) {
    if (names.has(user.username)) {
      throw invalidFile(file, `lists user ${user.username} twice`);
    }
    names.add(user.username);
  }
  return { version: 1, users };
}

/**
 * Adds or replaces `user` in the users file, creating the file when it is
 * missing. The file is written with mode 0600 through a temporary file and
 * a rename, so a reader never sees half a file.
 */
export function saveUser(file: string, user: PasswordUser): void {
  let users: PasswordUser[] = [];
  try {
    users = readUsersFile(file).users;
  } catch (err) {
    const cause = (err as Error).cause as NodeJS.ErrnoException | undefined;
    if (cause?.code !== 'ENOENT') throw err;
  }
  const kept = users.filter((entry) => entry.username !== user.username);
  const contents: UsersFile = { version: 1, users: [...kept, user] };
  const temporary = `${file}.${process.pid}.tmp`;
  writeFileSync(temporary, `${JSON.stringify(contents, null, 2)}\n`, {
    mode: 0o600,
  });
  renameSync(temporary, file);
}

/**
 * Users by name, with a verification that spends the same scrypt work for
 * an unknown username as for a known one.
 */
export class PasswordDirectory {
  readonly #users: Map<string, PasswordUser>;
  readonly #decoy: PasswordUser;

  constructor(users: PasswordUser[]) {
    this.#users = new Map(users.map((user) => [user.username, user]));
    this.#decoy = {
      username: '',
      identity: { role: 'aggregator', fleetId: 'decoy' },
      salt: randomBytes(16).toString('base64'),
      hash: randomBytes(DEFAULT_SCRYPT.keyLength).toString('base64'),
      scrypt: { ...DEFAULT_SCRYPT },
    };
  }

  /** Reads a users file; see {@link readUsersFile}. */
  static fromFile(file: string): PasswordDirectory {
    return new PasswordDirectory(readUsersFile(file).users);
  }

  get size(): number {
    return this.#users.size;
  }

  /** True when `username` is listed. */
  has(username: string): boolean {
    return this.#users.has(username);
  }

  /** Returns the identity of a valid username and password, else undefined. */
  async authenticate(
    username: string,
    password: Buffer,
  ): Promise<FleetIdentity | undefined> {
    const user = this.#users.get(username);
    const matches = await verifyPassword(user ?? this.#decoy, password);
    return matches && user !== undefined ? { ...user.identity } : undefined;
  }
}
