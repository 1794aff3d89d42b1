"""CsvLogger (the DVC plot files): a key that first appears late widens the header instead of being dropped."""
from __future__ import annotations

import csv

from flexvar.run_logger import CsvLogger


def _rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_late_key_widens_the_header_and_keeps_its_value(tmp_path):
    path = tmp_path / "feature_net.csv"
    log = CsvLogger(path)
    for step in (10, 20):
        log.log_metrics({"train_loss": 1.0 / step, "train_accuracy": 0.5}, step=step)
    log.log_metrics({"val_loss": 0.25, "val_accuracy": 0.9}, step=30)   # like feature_net's last row
    log.log_metrics({"train_loss": 0.01, "train_accuracy": 1.0}, step=40)
    fields, rows = _rows(path)
    assert fields == ["step", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    assert [r["step"] for r in rows] == ["10", "20", "30", "40"]
    assert rows[2]["val_loss"] == "0.25" and rows[2]["val_accuracy"] == "0.9" and rows[2]["train_loss"] == ""
    assert rows[0]["train_loss"] == "0.1" and rows[0]["val_loss"] == ""
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_truncates_rows_and_keeps_the_wide_header(tmp_path):
    path = tmp_path / "val.csv"
    log = CsvLogger(path)
    log.log_metrics({"a": 1.0}, step=1)
    log.log_metrics({"a": 2.0, "b": 3.0}, step=2)
    log.log_metrics({"a": 4.0, "b": 5.0}, step=3)
    resumed = CsvLogger(path, resume_from_step=3)
    fields, rows = _rows(path)
    assert fields == ["step", "a", "b"] and [r["step"] for r in rows] == ["1", "2"]
    resumed.log_metrics({"a": 6.0, "c": 7.0}, step=3)
    fields, rows = _rows(path)
    assert fields == ["step", "a", "b", "c"]
    assert [(r["step"], r["b"], r["c"]) for r in rows] == [("1", "", ""), ("2", "3.0", ""), ("3", "", "7.0")]
    CsvLogger(path)                      # a fresh (not resumed) run starts the file over
    assert not path.exists()
