"""Where evaluation results go: resumable shards of per-sample records, the aggregate, the summary table.

A unit of work (one task x shot count x trial) is cut into shards of consecutive test samples. Each
finished shard is written atomically as JSON under a folder named by a fingerprint of everything
that decides its content (model, task, template, shots, seed, demo selection, generation settings),
so a rerun skips exactly the shards that are already done, and a changed setting never reuses one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


class ShardStore:
    """Finished shards of one unit of work, in `<root>/<unit>-<fingerprint>/shard_00000.json`."""

    def __init__(self, root: Path | None, unit: str, spec: dict):
        self.spec = spec
        self.dir = None if root is None else Path(root) / f"{unit}-{fingerprint(spec)}"

    def _path(self, index: int) -> Path:
        return self.dir / f"shard_{index:05d}.json"

    def load(self, index: int, ids: list[str]) -> list[dict] | None:
        """The shard's records if it was finished for exactly these sample ids, else None."""
        if self.dir is None or not self._path(index).exists():
            return None
        try:
            with open(self._path(index), encoding="utf-8") as f:
                saved = json.load(f)
        except (json.JSONDecodeError, OSError):
            return None  # a damaged shard is recomputed
        if saved.get("ids") != ids:
            return None
        return saved["records"]

    def save(self, index: int, ids: list[str], records: list[dict]) -> None:
        if self.dir is None:
            return
        if index == 0 or not (self.dir / "spec.json").exists():
            write_json(self.dir / "spec.json", self.spec)
        write_json(self._path(index), {"ids": ids, "records": records})


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (numpy's default, as OpenFlamingo reports)."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def aggregate_trials(trials: list[dict]) -> tuple[dict, dict]:
    """Mean and std over trials of every numeric metric that all trials report."""
    keys = [k for k, v in trials[0]["metrics"].items() if isinstance(v, (int, float))]
    mean, std = {}, {}
    for k in keys:
        vals = [t["metrics"].get(k) for t in trials]
        if all(isinstance(v, (int, float)) for v in vals):
            mean[k], std[k] = mean_std(vals)
    return mean, std


def summary_table(results: dict) -> str:
    """A plain-text table: one row per task and shot count, primary metric as mean ± std; then the blind
    baseline's metrics (the same model without media), where it was run."""
    rows = [("task", "shots", "metric", "score", "trials", "n")]
    for task, by_shots in results.items():
        for shots, r in by_shots.items():
            metric = r["primary_metric"]
            m, s = r["mean"].get(metric), r["std"].get(metric)
            score = "n/a" if m is None else (f"{m:.2f}" if len(r["trials"]) == 1 else f"{m:.2f} ± {s:.2f}")
            rows.append((task, str(shots), metric, score, str(len(r["trials"])), str(r["n"])))
        first = next(iter(by_shots.values()), {})
        for key, value in (first.get("blind") or {}).items():  # shot-independent: once per task
            if isinstance(value, float):
                rows.append((f"{task}[blind]", "0", key, f"{value:.2f}", "1", str(first["n"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
