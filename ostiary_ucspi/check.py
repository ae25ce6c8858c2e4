"""``ostiary-handle --check``: validate a configuration and say what it would run.

Prints each action's command, uid, gid and undo (never a passphrase), warns
about a config others can read and passphrases under 12 characters, refuses a
world-writable config or action file. Exit 0 only when the config is usable.
"""
from __future__ import annotations

import os
import stat
import sys

from .actions import ActionRefused, prepare, resolve_ids
from .config import Config, ConfigError, load

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
    db_dir = os.path.dirname(cfg.lockout_db)
    if not os.path.isdir(db_dir):
        errors.append(f"LOCKOUT_DB directory {db_dir} does not exist")
    for line, key in cfg.unused:
        warnings.append(f"{name}:{line}: {key} is for Ostiary's own listener; not used here")
    return errors, warnings


def report(cfg: Config) -> list[str]:
    """Return the lines that describe what ``cfg`` would do."""
    lines = [f"config {cfg.path}", f"lockout store {cfg.lockout_db}",
             f"max bad connections {cfg.max_bad_conns}, comm timeout {cfg.comm_timeout}s, "
             f"delay {cfg.delay}s"]
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


def check_main(path: str) -> int:
    """Run the check; print to stdout, problems to stderr; return the exit status."""
    try:
        cfg = load(path)
    except ConfigError as e:
        print(f"ostiary-handle: fatal: {e}", file=sys.stderr)
        return 111
    errors, warnings = problems(cfg)
    print("\n".join(report(cfg)))
    for w in warnings:
        print(f"ostiary-handle: warning: {w}", file=sys.stderr)
    for e in errors:
        print(f"ostiary-handle: fatal: {e}", file=sys.stderr)
    if errors:
        return 111
    print("ok")
    return 0
