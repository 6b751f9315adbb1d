"""An on-disk cache of report scores: sqlite, keyed by a hash of (scorer identity, reference,
candidate), so evaluation and repeated runs do not query the judge again.

Concurrent-safe across threads and processes (several PPO ranks may share one file): every call
opens its own connection, sqlite's file locking serialises the writers (WAL journal, a generous
busy timeout), and a write is one ``INSERT OR REPLACE`` transaction. Only successful scores are
stored; a failure is retried on the next call.

Creating the file is the one racy moment: two connections that switch a new file to WAL at once
can deadlock on the lock upgrade, and sqlite then answers "database is locked" at once instead of
waiting (its busy handler is skipped for deadlocks), so the set-up is retried until the timeout.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from radialog_rl.errors import ConfigError

__all__ = ["ScoreCache"]

_SCHEMA = "CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, score REAL NOT NULL)"
_BATCH = 500  # sqlite's bound-parameter limit is 999 on old builds
_TIMEOUT_S = 60.0


class ScoreCache:
    """Scores in ``path`` (a sqlite file; its folder is created)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise ConfigError(f"score cache {self.path} is a folder; give a file path such as scores.sqlite")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _TIMEOUT_S
        delay = 0.01
        while True:
            try:
                self._set_up()
                return
            except sqlite3.OperationalError as exc:
                if _is_lock_error(exc) and time.monotonic() < deadline:
                    time.sleep(delay)  # another process is creating the same file: try again
                    delay = min(delay * 2, 0.5)
                    continue
                raise ConfigError(f"score cache {self.path} is not a usable sqlite file: {exc}") from None
            except sqlite3.DatabaseError as exc:
                raise ConfigError(f"score cache {self.path} is not a usable sqlite file: {exc}") from None

    def _set_up(self) -> None:
        db = self._connect()
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")  # persistent: done once per file
            db.execute(_SCHEMA)
            db.commit()
        finally:
            db.close()

    @staticmethod
    def key(namespace: str, reference: str, candidate: str) -> str:
        """The cache key of one pair under a scorer's ``namespace`` (its identity)."""
        digest = hashlib.sha256()
        for part in (namespace, reference, candidate):
            data = part.encode()
            digest.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguity
            digest.update(data)
        return digest.hexdigest()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=_TIMEOUT_S)

    def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        """The cached scores among ``keys``."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, float] = {}
        db = self._connect()
        try:
            for start in range(0, len(keys), _BATCH):
                chunk = keys[start : start + _BATCH]
                marks = ",".join("?" * len(chunk))
                found.update(db.execute(f"SELECT key, score FROM scores WHERE key IN ({marks})", chunk))
        finally:
            db.close()
        return found

    def put_many(self, scores: Mapping[str, float]) -> None:
        """Store ``{key: score}`` (one transaction)."""
        db = self._connect()
        try:
            with db:
                db.executemany("INSERT OR REPLACE INTO scores (key, score) VALUES (?, ?)",
                               [(k, float(v)) for k, v in scores.items()])
        finally:
            db.close()

    def __len__(self) -> int:
        db = self._connect()
        try:
            return int(db.execute("SELECT COUNT(*) FROM scores").fetchone()[0])
        finally:
            db.close()


def _is_lock_error(exc: sqlite3.OperationalError) -> bool:
    message = str(exc).lower()
    return "locked" in message or "busy" in message
