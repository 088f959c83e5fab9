"""Results on disk: ``results.jsonl`` written one fsynced line per run, read back line by line with
every record validated (damaged lines are moved to ``results.rejected.jsonl``, never deleted)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..experiment import TrialConfig, config_id
from .spec import _FIELDS


def _append_line(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single write, then fsync: a crash can only truncate this line."""
    line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def load_results(path: str | Path, *, repair: bool = False) -> dict[str, dict[str, Any]]:
    """``{run_id: record}`` of the valid records of a ``results.jsonl`` (the last one wins for a repeated id).

    A line is a valid record when it is a JSON object with a string ``run_id``, a ``config`` that
    :meth:`TrialConfig.from_dict` accepts and whose :func:`~canonreg.experiment.config_id` is the
    ``run_id``, and a ``result`` table. A complete last record without its final newline is valid.
    Any other line (an incomplete last line left by a crash, corrupt text, a damaged config) is
    skipped with one ``RuntimeWarning`` naming the file and the line numbers; with ``repair=True``
    those lines are moved to ``results.rejected.jsonl`` beside the file (``{"line", "reason",
    "text", "at"}`` per line) and the file is rewritten atomically with the valid lines, byte for
    byte (a missing final newline is added); records of a run that a later line of the same run id replaces
    (a run recomputed, e.g. with a measurement) are moved to ``results.superseded.jsonl``, so the file
    keeps one line per run. Nothing is ever deleted.
    """
    p = Path(path)
    if not p.exists():
        return {}
    data = p.read_bytes()
    pieces = data.split(b"\n")
    tail = pieces.pop()  # b"" when the file ends with a newline, else an unterminated last line
    good: list[tuple[bytes, dict[str, Any]]] = []
    bad: list[tuple[int, str, bytes]] = []
    for i, raw in enumerate([*pieces, tail] if tail else pieces, 1):
        if not raw.strip():
            continue
        rec, problem = _parse_record(raw)
        if problem is not None and raw is tail and problem.startswith("is not valid JSON"):
            problem = "is incomplete (no final newline and not valid JSON: an interrupted write)"
        if problem is None:
            good.append((raw, rec))
        else:
            bad.append((i, problem, raw))
    out = {str(rec["run_id"]): rec for _, rec in good}
    last = {str(rec["run_id"]): i for i, (_, rec) in enumerate(good)}
    superseded = [raw for i, (raw, rec) in enumerate(good) if last[str(rec["run_id"])] != i]
    if bad:
        rejected = p.with_name(p.stem + ".rejected.jsonl")
        shown = "; ".join(f"line {n} of {str(p)!r} {why}" for n, why, _ in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        action = f"moved to {str(rejected)!r}; their runs will be recomputed" if repair else "skipped"
        warnings.warn(f"{shown}{more} ({len(bad)} damaged line(s) {action})", RuntimeWarning, stacklevel=2)
    if repair and (bad or superseded):
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for n, why, raw in bad:
            _append_line(rejected, {"line": n, "reason": why, "text": raw.decode("utf-8", errors="replace"), "at": stamp})
        if superseded:  # a run recomputed (e.g. with a measurement): its older records, kept beside the file
            with open(p.with_name(p.stem + ".superseded.jsonl"), "ab") as f:
                f.write(b"".join(raw + b"\n" for raw in superseded))
                f.flush()
                os.fsync(f.fileno())
        kept = {id(raw) for raw in superseded}
        _atomic_write(p, b"".join(raw + b"\n" for raw, _ in good if id(raw) not in kept))
    elif repair and tail:
        with open(p, "ab") as f:  # a complete last record: only its newline was missing
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
    return out


def _parse_record(raw: bytes) -> tuple[dict[str, Any], str | None]:
    """``(record, None)`` for a valid results line, else ``({}, reason)`` (see :func:`load_results`)."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return {}, "is not UTF-8 text"
    except json.JSONDecodeError as e:
        return {}, f"is not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(rec, dict):
        return {}, f"is not a JSON object but a {type(rec).__name__}"
    rid = rec.get("run_id")
    if not isinstance(rid, str):
        return {}, f"has no string `run_id` (got {rid!r})"
    cfg = rec.get("config")
    if not isinstance(cfg, dict):
        return {}, f"has no `config` table (got {type(cfg).__name__})"
    try:
        trial = TrialConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        return {}, f"has a damaged config: {e}"
    missing = [f for f in _FIELDS if f not in cfg]
    if missing:  # records hold the complete resolved config; summaries read every field
        return {}, f"has a damaged config: missing field(s) {missing}"
    if config_id(trial) != rid:
        return {}, (
            f"has run id {rid!r}, which is not the id of its config ({config_id(trial)!r}): a damaged record, "
            "or one written by a canonreg with another result version"
        )
    if not isinstance(rec.get("result"), dict):
        return {}, f"has no `result` table (got {type(rec.get('result')).__name__})"
    if not isinstance(rec.get("env", {}), dict):
        return {}, "has an `env` that is not a table"
    return rec, None


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temporary file in the same folder, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
