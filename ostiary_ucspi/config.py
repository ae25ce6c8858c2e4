"""Parse an Ostiary 4.0 ``ostiary.cfg`` (plus this project's extensions).

Line oriented ``KEY=value``; ``#`` starts a comment outside double quotes;
strings are double-quoted and may contain ``\\"`` (and ``\\\\``). Every error
is a :class:`ConfigError` that names the file (as given) and line.

Extensions to Ostiary 4.0 (all optional):

``LOCKOUT_DB=/abs/path``        the lockout store (default /var/lib/ostiary/lockout.cdb)
``UNDO=seconds,"/abs/cmd"``     timed undo of the ACTION just above it: a door (doors.py);
                                a knock while it is open runs the ACTION again (so actions
                                must be idempotent) and moves the one UNDO to seconds later
``STRIKE_EXPIRE=seconds``       forget strikes of unlocked addresses (default 86400)
``LOCKOUT_EXPIRE=seconds``      unlock after this long (default 0: never)
``IPV6_PREFIX=bits``            IPv6 strikes are counted per prefix (default 64)
``IPCACHE_SIZE=n``              store records before EXIT_ON_IPCACHE_FULL trips (128)
"""

import os

# Where the programs look for ostiary.cfg without -c, in this order: the first
# that exists is used. Directories only root may write (no /usr/local, no /tmp).
SEARCH = ("/etc/ostiary.cfg", "/etc/ostiary/ostiary.cfg")
DEFAULT_PATH = SEARCH[0]
DEFAULT_DB = "/var/lib/ostiary/lockout.cdb"

LOG_LEVELS = {
    "LOG_EMERG": 0,
    "LOG_ALERT": 1,
    "LOG_CRIT": 2,
    "LOG_ERR": 3,
    "LOG_WARNING": 4,
    "LOG_NOTICE": 5,
    "LOG_INFO": 6,
    "LOG_DEBUG": 7,
}
# Keys that only make sense for the C daemon's own listener: accepted, unused.
LISTENER_KEYS = ("PORT", "LOCAL_IP", "SKIP_DETACH", "IGNORE_URANDOM", "PIDFILE")
FLAG_KEYS = ("EXIT_ON_IPCACHE_FULL", "SKIP_DETACH", "IGNORE_URANDOM")
UNDO_MAX = 7 * 86400
ID_MAX = 2**32 - 2  # (uid_t)-1 means "leave unchanged" to setresuid


def find() -> str:
    """Return the first file of SEARCH that exists, else the first of SEARCH."""
    for path in SEARCH:
        if os.path.lexists(path):
            return path
    return SEARCH[0]


class ConfigError(Exception):
    """A configuration problem, already phrased as ``file:line: reason``."""


class Action:
    """One command a passphrase (or a lockout) triggers."""

    __slots__ = ("secret", "command", "uid", "gid", "undo", "undo_delay", "line")

    def __init__(
        self, secret: bytes, command: str, uid: int | None, gid: int | None, line: int
    ) -> None:
        self.secret = secret
        self.command = command
        self.uid = uid
        self.gid = gid
        self.undo: str | None = None
        self.undo_delay = 0
        self.line = line


class Config:
    """A parsed, validated configuration; unset ids mean DEFAULT_UID/GID."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.kill: bytes = b""
        self.actions: list[Action] = []
        self.lockout_action: Action | None = None
        self.lockout_db = DEFAULT_DB
        self.editor = 0  # who besides root may edit the file (-1: a group): see store.StateDir
        self.delay = 5
        self.comm_timeout = 5
        self.max_bad_conns = 3
        self.max_single_errs = 0
        self.max_total_errs = 0
        self.exit_on_ipcache_full = False
        self.ipcache_size = 128
        self.default_uid: int | None = None
        self.default_gid: int | None = None
        self.min_loglevel = LOG_LEVELS["LOG_NOTICE"]
        self.strike_expire = 86400
        self.lockout_expire = 0
        self.ipv6_prefix = 64
        self.unused: list[tuple[int, str]] = []

    def ids(self, action: Action) -> tuple[int | None, int | None]:
        """Return the (uid, gid) an action runs as; None means 'as the handler'."""
        uid = action.uid if action.uid is not None else self.default_uid
        gid = action.gid if action.gid is not None else self.default_gid
        return uid, gid


def split_fields(text: str, where: str) -> list[tuple[str, bool]]:
    """Split a value on commas outside quotes; return (field, was_quoted) pairs."""
    fields: list[tuple[str, bool]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == '"':
            i += 1
            buf = []
            while True:
                if i >= n:
                    raise ConfigError(f"{where}: unterminated string")
                c = text[i]
                if c == "\\" and i + 1 < n and text[i + 1] in '"\\':
                    buf.append(text[i + 1])
                    i += 2
                elif c == '"':
                    i += 1
                    break
                else:
                    buf.append(c)
                    i += 1
            fields.append(("".join(buf), True))
            while i < n and text[i] in " \t":
                i += 1
            if i < n and text[i] != ",":
                raise ConfigError(f"{where}: unexpected text after a quoted string")
        else:
            j = text.find(",", i)
            j = n if j < 0 else j
            word = text[i:j].strip()
            if '"' in word:
                raise ConfigError(f"{where}: stray quote")
            fields.append((word, False))
            i = j
        if i >= n:
            return fields
        i += 1  # the comma


def strip_comment(line: str) -> str:
    """Drop a ``#`` comment that is not inside a quoted string."""
    if '"' not in line:  # most lines: no string to skip
        return line.partition("#")[0]
    quoted = False
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\" and quoted:
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "#" and not quoted:
            return line[:i]
        i += 1
    return line


def to_int(value: str, where: str, key: str, low: int, high: int | None = None) -> int:
    """Parse a decimal integer within [low, high]."""
    v = value.strip().strip('"')
    if not v.isdigit() or not v.isascii():
        raise ConfigError(f"{where}: {key} must be a whole number, not {value!r}")
    if len(v) > 18:  # int() refuses over 4300 digits; nothing here needs 19
        raise ConfigError(f"{where}: {key} is too large: {v[:20]}...")
    n = int(v)
    if n < low or (high is not None and n > high):
        top = "" if high is None else f" and {high}"
        raise ConfigError(f"{where}: {key} must be at least {low}{top}, not {n}")
    return n


def to_id(value: str, where: str, kind: str) -> int:
    """Resolve a uid or gid given as a number or a name."""
    if value.isdigit() and value.isascii():
        if len(value) > 10 or int(value) > ID_MAX:
            raise ConfigError(f"{where}: {kind} out of range (0 to {ID_MAX}): {value[:20]}")
        return int(value)
    try:
        if kind == "uid":
            import pwd

            return pwd.getpwnam(value).pw_uid
        import grp

        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ConfigError(
            f"{where}: no such {'user' if kind == 'uid' else 'group'}: {value!r}"
        ) from None


def parse_action(key: str, value: str, where: str, line: int) -> Action:
    """Parse ``"pass","/abs/cmd"[,uid[,gid]]``."""
    fields = split_fields(value, where)
    if len(fields) < 2 or len(fields) > 4:
        raise ConfigError(f'{where}: {key} takes "passphrase","/abs/command"[,uid[,gid]]')
    (secret, quoted), (command, _) = fields[0], fields[1]
    if not quoted:
        raise ConfigError(f"{where}: {key} passphrase must be a quoted string")
    if not command.startswith("/"):
        raise ConfigError(f"{where}: {key} command must be an absolute path")  # may be a secret
    if "\0" in command or "\n" in command:
        raise ConfigError(f"{where}: {key} command contains a control character")
    uid = to_id(fields[2][0], where, "uid") if len(fields) > 2 and fields[2][0] else None
    gid = to_id(fields[3][0], where, "gid") if len(fields) > 3 and fields[3][0] else None
    return Action(secret.encode(), command, uid, gid, line)


def load(path: str) -> Config:
    """Read and validate ``path``; raise ConfigError on any problem (world-writable included)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"unable to read {path}: {e.strerror}") from None
    if st.st_mode & 0o002:
        raise ConfigError(f"{path}: anyone may write to it (chmod 600): refusing it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8") from None
    cfg = parse(text, path)
    cfg.editor = -1 if st.st_mode & 0o020 and st.st_gid else st.st_uid
    return cfg


def parse(text: str, path: str) -> Config:
    """Parse configuration ``text``; ``path`` names it in messages, as given."""
    name = path
    cfg = Config(path)
    secrets: dict[bytes, int] = {}
    seen: dict[str, int] = {}
    prev = ""
    for lineno, raw in enumerate(text.split("\n"), 1):
        where = f"{name}:{lineno}"
        if "\0" in raw:
            raise ConfigError(f"{where}: NUL byte")
        line = strip_comment(raw).strip()
        if not line:
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        value = value.strip()
        if not eq:
            if key in FLAG_KEYS:
                value = "1"
            else:
                raise ConfigError(f"{where}: expected KEY=value")  # the text may be a secret
        if key in seen and key not in ("ACTION", "UNDO"):
            raise ConfigError(f"{where}: {key} already set on line {seen[key]}")
        seen[key] = lineno
        if key in ("KILL", "ACTION"):
            if key == "KILL":
                fields = split_fields(value, where)
                if len(fields) != 1 or not fields[0][1]:
                    raise ConfigError(f'{where}: KILL takes one quoted passphrase: KILL="..."')
                secret = fields[0][0].encode()
                cfg.kill = secret
            else:
                act = parse_action(key, value, where, lineno)
                secret = act.secret
                cfg.actions.append(act)
            if not secret:
                raise ConfigError(f"{where}: empty passphrase")
            if secret in secrets:
                raise ConfigError(f"{where}: passphrase already used on line {secrets[secret]}")
            secrets[secret] = lineno
        elif key == "LOCKOUT_ACTION":
            cfg.lockout_action = parse_action(key, value, where, lineno)
        elif key == "UNDO":
            fields = split_fields(value, where)
            if len(fields) != 2:
                raise ConfigError(f'{where}: UNDO takes seconds,"/abs/command"')
            if prev != "ACTION":
                raise ConfigError(f"{where}: UNDO must come right after the ACTION it undoes")
            act = cfg.actions[-1]
            act.undo_delay = to_int(fields[0][0], where, "UNDO delay", 1, UNDO_MAX)
            act.undo = fields[1][0]
            if not act.undo.startswith("/"):
                raise ConfigError(f"{where}: UNDO command must be an absolute path: {act.undo!r}")
        elif key == "LOCKOUT_DB":
            db = split_fields(value, where)[0][0]
            if not db.startswith("/"):
                raise ConfigError(f"{where}: LOCKOUT_DB must be an absolute path")
            cfg.lockout_db = db
        elif key == "DELAY":
            cfg.delay = to_int(value, where, key, 0, 3600)
        elif key == "COMM_TIMEOUT":
            cfg.comm_timeout = to_int(value, where, key, 1, 600)
        elif key == "MAX_BAD_CONNS":
            cfg.max_bad_conns = to_int(value, where, key, 1)
        elif key == "MAX_SINGLE_ERRS":
            cfg.max_single_errs = to_int(value, where, key, 1)
        elif key == "MAX_TOTAL_ERRS":
            cfg.max_total_errs = to_int(value, where, key, 1)
        elif key == "EXIT_ON_IPCACHE_FULL":
            cfg.exit_on_ipcache_full = to_flag(value, where, key)
        elif key == "IPCACHE_SIZE":
            cfg.ipcache_size = to_int(value, where, key, 1)
        elif key == "DEFAULT_UID":
            cfg.default_uid = to_id(value.strip('"'), where, "uid")
        elif key == "DEFAULT_GID":
            cfg.default_gid = to_id(value.strip('"'), where, "gid")
        elif key == "MIN_LOGLEVEL":
            level = value.strip('"')
            if level not in LOG_LEVELS:
                raise ConfigError(f"{where}: MIN_LOGLEVEL must be one of {', '.join(LOG_LEVELS)}")
            cfg.min_loglevel = LOG_LEVELS[level]
        elif key == "STRIKE_EXPIRE":
            cfg.strike_expire = to_int(value, where, key, 1)
        elif key == "LOCKOUT_EXPIRE":
            cfg.lockout_expire = to_int(value, where, key, 0)
        elif key == "IPV6_PREFIX":
            cfg.ipv6_prefix = to_int(value, where, key, 1, 128)
        elif key in LISTENER_KEYS:
            if key in FLAG_KEYS:
                to_flag(value, where, key)
            cfg.unused.append((lineno, key))
        else:
            raise ConfigError(f"{where}: unknown key {key!r}")
        prev = key
    if not cfg.kill:
        raise ConfigError(f"{name}: KILL is mandatory")
    if not cfg.actions:
        raise ConfigError(f"{name}: at least one ACTION is needed")
    return cfg


def to_flag(value: str, where: str, key: str) -> bool:
    """Parse a flag: bare (as Ostiary 4.0 writes it) or yes/no, 1/0."""
    v = value.strip('"').lower()
    if v in ("1", "yes", "true"):
        return True
    if v in ("0", "no", "false"):
        return False
    raise ConfigError(f"{where}: {key} is a flag: write it alone, or =yes/=no")
