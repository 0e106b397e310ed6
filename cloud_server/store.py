"""The cloud's durable state: rounds, participants and metrics in SQLite (WAL), adapter versions as safetensors."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from shared.protocol.bundle import AdapterBundle

UNFINISHED = ("pending", "running", "aggregating")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round_id     INTEGER PRIMARY KEY,
    state        TEXT NOT NULL,
    request      TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    version      INTEGER,
    participants TEXT NOT NULL DEFAULT '[]',
    progress     TEXT NOT NULL DEFAULT '{}',
    metrics      TEXT NOT NULL DEFAULT '{}',
    error        TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    version    INTEGER PRIMARY KEY,
    round_id   INTEGER,
    file       TEXT NOT NULL,
    nbytes     INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class Store:
    """SQLite at ``data_dir/splitllm.db`` and ``data_dir/adapters/v<N>.safetensors``.

    A version becomes visible only when its row is committed, in the same transaction that marks
    the round committed; the file is written (and fsynced) and renamed into place first, so a
    crash leaves at most an unreferenced file, never a row without its tensors.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir)
        self.adapter_dir = self.dir / "adapters"
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.dir / "splitllm.db"), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    # settings -----------------------------------------------------------------------------
    def get_setting(self, key: str) -> Any | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_setting(self, key: str, value: Any) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # rounds -----------------------------------------------------------------------------------
    def next_round_id(self) -> int:
        row = self.db.execute("SELECT COALESCE(MAX(round_id), 0) FROM rounds").fetchone()
        return int(row[0]) + 1

    def save_round(self, record: dict[str, Any]) -> None:
        now = time.time()
        with self.lock:
            self.db.execute(
                """INSERT INTO rounds (round_id, state, request, base_version, version, participants, progress,
                                       metrics, error, created_at, updated_at)
                   VALUES (:round_id, :state, :request, :base_version, :version, :participants, :progress,
                           :metrics, :error, :now, :now)
                   ON CONFLICT(round_id) DO UPDATE SET state = excluded.state, version = excluded.version,
                       participants = excluded.participants, progress = excluded.progress,
                       metrics = excluded.metrics, error = excluded.error, updated_at = excluded.updated_at""",
                self._row(record, now))

    @staticmethod
    def _row(record: dict[str, Any], now: float) -> dict[str, Any]:
        return {"round_id": record["round_id"], "state": record["state"], "request": json.dumps(record["request"]),
                "base_version": record["base_version"], "version": record["version"],
                "participants": json.dumps(record["participants"]), "progress": json.dumps(record["progress"]),
                "metrics": json.dumps(record["metrics"]), "error": record["error"], "now": now}

    def rounds(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM rounds ORDER BY round_id").fetchall()
        return [self._record(r) for r in rows]

    def round(self, round_id: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM rounds WHERE round_id = ?", (round_id,)).fetchone()
        return self._record(row) if row else None

    def _record(self, row: tuple) -> dict[str, Any]:
        cols = [d[0] for d in self.db.execute("SELECT * FROM rounds LIMIT 0").description]
        data = dict(zip(cols, row))
        for key in ("request", "participants", "progress", "metrics"):
            data[key] = json.loads(data[key])
        return data

    def fail_unfinished(self, reason: str) -> list[int]:
        """At start-up: rounds a previous process left running are failed; nothing committed changes."""
        with self.lock:
            ids = [r[0] for r in self.db.execute(
                f"SELECT round_id FROM rounds WHERE state IN ({','.join('?' * len(UNFINISHED))})", UNFINISHED)]
            self.db.execute(
                f"UPDATE rounds SET state = 'failed', error = ?, updated_at = ? WHERE state IN "
                f"({','.join('?' * len(UNFINISHED))})", (reason, time.time(), *UNFINISHED))
        return ids

    # versions ---------------------------------------------------------------------------------
    def _write_file(self, version: int, state: AdapterBundle) -> tuple[Path, int]:
        final = self.adapter_dir / f"v{version}.safetensors"
        tmp = final.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.tensors().items()}, str(tmp), metadata={"version": str(version)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final, final.stat().st_size

    def put_initial(self, state: AdapterBundle) -> None:
        if self.latest_version() is not None:
            return
        path, nbytes = self._write_file(0, state)
        with self.lock:
            self.db.execute("INSERT INTO versions (version, round_id, file, nbytes, created_at) VALUES (0, NULL, ?, ?, ?)",
                            (path.name, nbytes, time.time()))

    def commit(self, record: dict[str, Any], state: AdapterBundle) -> None:
        """The new version's file and row, and the round's committed state, together or not at all."""
        version = record["version"]
        path, nbytes = self._write_file(version, state)
        now = time.time()
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("INSERT INTO versions (version, round_id, file, nbytes, created_at) VALUES (?, ?, ?, ?, ?)",
                                (version, record["round_id"], path.name, nbytes, now))
                self.db.execute(
                    """UPDATE rounds SET state = :state, version = :version, participants = :participants,
                           progress = :progress, metrics = :metrics, error = :error, updated_at = :now
                       WHERE round_id = :round_id""", self._row(record, now))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def latest_version(self) -> int | None:
        row = self.db.execute("SELECT MAX(version) FROM versions").fetchone()
        return None if row[0] is None else int(row[0])

    def load_version(self, version: int) -> AdapterBundle:
        row = self.db.execute("SELECT file FROM versions WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise KeyError(f"no adapter version {version}")
        return AdapterBundle.from_tensors(load_file(str(self.adapter_dir / row[0])))

    def version_bytes(self, version: int) -> bytes:
        """The safetensors file of a version, as served by ``GET /v1/adapters/{version}``."""
        row = self.db.execute("SELECT file FROM versions WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise KeyError(f"no adapter version {version}")
        return (self.adapter_dir / row[0]).read_bytes()

