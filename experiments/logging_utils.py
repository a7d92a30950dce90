"""Results logging: a local JSONL file (what reports read) and W&B runs (offline unless a key is set).

The JSONL file is the commit point of a sweep: one complete line per finished run, appended with a
single `write` on an O_APPEND descriptor and fsync'ed. A run killed half-way leaves no line (or, if
killed inside the write, a truncated last line): `ResultsFile.rows()` skips unparsable lines (their numbers
in `bad_lines`, which callers report), and
`repair()` cuts a truncated tail before the next append so it can never glue onto a new row.
Each row carries `run_key` (a hash of the resolved run config); finished keys are skipped on resume.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

WANDB_PROJECT = "sparsevlm"  # the default W&B project (run.wandb_project overrides it)


def run_key(config: dict) -> str:
    """A stable short hash of a JSON-able run config."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


class ResultsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.bad_lines: list[int] = []

    def rows(self) -> list[dict]:
        """The parsable result rows; the 1-based numbers of the other non-empty lines go to `bad_lines`."""
        self.bad_lines: list[int] = []
        if not self.path.exists():
            return []
        out = []
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    row = None  # e.g. a truncated line from an interrupted write, or an edit
                if isinstance(row, dict) and "run_key" in row:
                    out.append(row)
                else:
                    self.bad_lines.append(number)
        return out

    def warn_bad_lines(self, file=None) -> None:
        """One line on stderr naming the lines `rows()` skipped (their runs count as not done)."""
        import sys

        if getattr(self, "bad_lines", None):
            print(
                f"warning: {self.path}: line(s) {', '.join(map(str, self.bad_lines))} are not result rows "
                "(not JSON objects with a run_key); skipped, the other rows kept",
                file=file or sys.stderr,
            )

    def keys(self) -> set[str]:
        return {r["run_key"] for r in self.rows()}

    def repair(self) -> int:
        """Drop a trailing partial line (no final newline). Returns the bytes removed."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return 0
        cut = data.rfind(b"\n") + 1
        with open(self.path, "r+b") as f:
            f.truncate(cut)
        return len(data) - cut

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repair()
        line = (json.dumps(row, sort_keys=True, default=_jsonable) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _jsonable(x: Any):
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(x)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write a whole JSONL file via a temp file + rename (per-sample files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=_jsonable) + "\n")
    os.replace(tmp, path)


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in columns})
    os.replace(tmp, path)


def wandb_mode() -> str:
    """`offline` unless WANDB_MODE says otherwise or an API key is available."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_run_id(project: str, group: str, key: str) -> str:
    """A W&B run id fixed by the run's identity: a run logged again after an interrupted sweep (killed
    between its W&B log and its results row) updates the same W&B run instead of adding a duplicate."""
    import hashlib

    return hashlib.sha1(f"{project}/{group}/{key}".encode()).hexdigest()[:20]


def log_wandb(
    row: dict,
    config: dict,
    out_dir: str | os.PathLike,
    group: str,
    name: str,
    project: str = WANDB_PROJECT,
    samples: list[dict] | None = None,
    key: str | None = None,
    tags: list[str] | None = None,
) -> str | None:
    """One W&B run for one finished evaluation: config, summary metrics, per-layer series, a samples table.
    `key` (the run key) fixes the W&B run id. Returns the run directory (offline) or None without wandb."""
    try:
        import wandb
    except ImportError:
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project,
        dir=str(out_dir),
        group=group,
        name=name,
        job_type="eval",
        tags=tags,
        id=wandb_run_id(project, group, key or name),
        resume="allow",
        config=config,
        mode=wandb_mode(),
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
    try:
        for i, (v, t) in enumerate(zip(row.get("visual_per_layer", []), row.get("tokens_per_layer", []))):
            run.log({"layer": i, "visual_tokens_in": v, "tokens_in": t})
        summary = {k: v for k, v in _flatten(row).items() if isinstance(v, (int, float, str, bool)) or v is None}
        run.summary.update(summary)
        if samples:
            cols = ["index", "qtype", "answer", "pred", "correct", "equivalent_tokens", "visual_per_layer"]
            table = wandb.Table(
                columns=cols,
                data=[[s.get(c) if c != "visual_per_layer" else json.dumps(s.get(c)) for c in cols] for s in samples],
            )
            run.log({"samples": table})
        path = run.dir
    finally:
        run.finish()
    return str(Path(path).parent)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out
