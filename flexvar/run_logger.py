"""The one small logging interface every training loop and stage writes through.

The library only knows `RunLogger`; the pipeline plugs in an MLflow-backed logger
(pipeline/tracking.py) and a CSV logger whose files DVC renders as plots.
"""
from __future__ import annotations

import csv
import os
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
    """Appends one row per log_metrics call to a CSV (columns fixed by the first row): a DVC plot.

    `resume_from_step` drops rows at or after that step, so a resumed run does not duplicate them.
    """

    def __init__(self, path: str | os.PathLike, resume_from_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields: list[str] | None = None
        if resume_from_step is None or not self.path.exists():
            self.path.unlink(missing_ok=True)
        else:
            self._truncate(resume_from_step)

    def _truncate(self, step: int) -> None:
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        self.fields = list(rows[0].keys()) if rows else None
        kept = [r for r in rows if int(r["step"]) < step]
        with open(self.path, "w", newline="") as f:
            if self.fields:
                w = csv.DictWriter(f, fieldnames=self.fields)
                w.writeheader()
                w.writerows(kept)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {"step": step if step is not None else 0, **{k: float(v) for k, v in metrics.items()}}
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


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
