"""The one small logging interface every training loop and stage writes through.

The library only knows `RunLogger`; the pipeline plugs in an MLflow-backed logger
(pipeline/tracking.py) and a CSV logger whose files DVC renders as plots.
"""
from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path
from typing import Any


class RunLogger:
    """No-op base: subclasses record params, step metrics and artifact files."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class CsvLogger(RunLogger):
    """Appends one row per log_metrics call to a CSV: a DVC plot. Never drops a column: a key not in the
    header yet (val metrics that first appear at the last step) rewrites the file once with the wider
    header, earlier rows left empty in the new column. The rewrite streams row by row (memory: one row).

    `resume_from_step` drops rows at or after that step, so a resumed run does not duplicate them.
    """

    def __init__(self, path: str | os.PathLike, resume_from_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields: list[str] | None = None
        if resume_from_step is None or not self.path.exists():
            self.path.unlink(missing_ok=True)
        else:
            self._rewrite(None, keep=lambda r: int(r["step"]) < resume_from_step)

    def _rewrite(self, fields: list[str] | None, keep=lambda row: True) -> None:
        """Copy the file through a temp file with header `fields` (None: its own), keeping rows `keep` accepts."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(self.path, newline="") as src, open(tmp, "w", newline="") as dst:
            reader = csv.DictReader(src)
            fields = fields or list(reader.fieldnames or [])
            if fields:
                w = csv.DictWriter(dst, fieldnames=fields)
                w.writeheader()
                w.writerows(r for r in reader if keep(r))
        tmp.replace(self.path)
        self.fields = fields or None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {"step": step if step is not None else 0, **{k: float(v) for k, v in metrics.items()}}
        new = self.fields is None
        if new:
            self.fields = list(row)
        elif any(k not in self.fields for k in row):
            self._rewrite(self.fields + [k for k in row if k not in self.fields])
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                w.writeheader()
            w.writerow(row)


class LineLogger(RunLogger):
    """Prints one progress line per log_metrics call (`<prefix>: step 3/6 loss 2.41 ... (12s)`), flushed,
    so a long stage shows where it is in dvc's / the flow's output. `keys`: the metrics printed."""

    def __init__(self, prefix: str, total: int, keys: tuple[str, ...]):
        self.prefix, self.total, self.keys, self.t0 = prefix, total, keys, time.perf_counter()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        shown = " ".join(f"{k} {metrics[k]:.4g}" for k in self.keys if metrics.get(k) is not None)
        print(f"{self.prefix}: step {step}/{self.total} {shown} ({time.perf_counter() - self.t0:.0f}s)",
              file=sys.stdout, flush=True)


class MultiLogger(RunLogger):
    """Fan one call out to several loggers."""

    def __init__(self, loggers: list[RunLogger]):
        self.loggers = loggers

    def log_params(self, params):
        for lg in self.loggers:
            lg.log_params(params)

    def log_metrics(self, metrics, step=None):
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_artifact(self, path, artifact_path=None):
        for lg in self.loggers:
            lg.log_artifact(path, artifact_path)

    def close(self):
        for lg in self.loggers:
            lg.close()
