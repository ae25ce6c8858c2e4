"""``ostiary-handle --check``: validate a configuration and say what it would run.

Prints each action's command, uid, gid and undo (never a passphrase), warns
about a config others can read and passphrases under 12 characters, refuses a
world-writable config or action file, and opens the lockout store as a
connection does (so, run as the handler's account, it fails when that account
cannot use the store). Exit 0 only when the config is usable.
"""

from __future__ import annotations

import os
import stat
import sys

from .actions import ActionRefused, prepare, resolve_ids
from .config import SEARCH, Config, ConfigError, find, load
from .store import Store, StoreError

MIN_SECRET = 12


def problems(cfg: Config) -> tuple[list[str], list[str]]:
    """Return (errors, warnings) about ``cfg`` beyond its syntax."""
    errors: list[str] = []
    warnings: list[str] = []
    name = cfg.path
    st = os.stat(cfg.path)  # load() refused a world-writable one
    if st.st_mode & (stat.S_IROTH | stat.S_IRGRP):
        warnings.append(f"{name} is readable by others (chmod 600): it holds the passphrases")
    if len(cfg.kill) < MIN_SECRET:
        warnings.append(f"KILL passphrase is shorter than {MIN_SECRET} characters")
    entries = [(f"action {i}", a) for i, a in enumerate(cfg.actions, 1)]
    if cfg.lockout_action is not None:
        entries.append(("lockout action", cfg.lockout_action))
    for what, a in entries:
        if what != "lockout action" and len(a.secret) < MIN_SECRET:
            warnings.append(f"{name}:{a.line}: passphrase is shorter than {MIN_SECRET} characters")
        try:
            prepare(cfg.ids(a), a.command, a.undo)
        except ActionRefused as e:
            errors.append(f"{name}:{a.line}: {what}: {e}")
    why = store_problem(cfg.lockout_db)
    if why:
        errors.append(f"lockout store: {why}")
    for line, key in cfg.unused:
        warnings.append(f"{name}:{line}: {key} is for Ostiary's own listener; not used here")
    return errors, warnings


def store_problem(path: str) -> str | None:
    """Open the store at ``path`` as a connection does; return why that fails, or None.

    A connection reads the store and takes the writers' lock (creating the
    lock file and an empty snapshot the first time), then appends to the
    journal: a check that only looked at the directory passed a store the
    handler's account cannot read or write.
    """
    store = Store(path)
    try:
        with store.lock():
            pass
        if os.path.exists(store.journal):
            os.close(os.open(store.journal, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
    except StoreError as e:
        return str(e)
    except OSError as e:
        return f"unable to open {store.journal}: {e.strerror}"
    return None


def report(cfg: Config, searched: bool) -> list[str]:
    """Return the lines that describe what ``cfg`` would do; ``searched``: no -c was given."""
    used = f" (the first of {', '.join(SEARCH)} that exists)" if searched else ""
    lines = [
        f"config {cfg.path}{used}",
        f"lockout store {cfg.lockout_db}",
        f"max bad connections {cfg.max_bad_conns}, comm timeout {cfg.comm_timeout}s, "
        f"delay {cfg.delay}s",
    ]
    entries = [(f"action {i}", a) for i, a in enumerate(cfg.actions, 1)]
    if cfg.lockout_action is not None:
        entries.append(("lockout action", cfg.lockout_action))
    for what, a in entries:
        try:
            uid, gid = resolve_ids(*cfg.ids(a))
            who = f"uid {uid} gid {gid}"
        except ActionRefused as e:
            who = f"cannot run: {e}"
        undo = f", undo {a.undo} after {a.undo_delay}s" if a.undo else ""
        lines.append(f"{what} (line {a.line}): {a.command} ADDRESS as {who}{undo}")
    lines.append("KILL: stops the service until 'ostiary-lockout revive'")
    return lines


def check_main(path: str | None) -> int:
    """Check ``path`` (None: search); print to stdout, problems to stderr; return the status."""
    searched = path is None
    try:
        cfg = load(find() if path is None else path)
    except ConfigError as e:
        print(f"ostiary-handle: fatal: {e}", file=sys.stderr)
        return 111
    errors, warnings = problems(cfg)
    print("\n".join(report(cfg, searched)))
    for w in warnings:
        print(f"ostiary-handle: warning: {w}", file=sys.stderr)
    for e in errors:
        print(f"ostiary-handle: fatal: {e}", file=sys.stderr)
    if errors:
        return 111
    print("ok")
    return 0
