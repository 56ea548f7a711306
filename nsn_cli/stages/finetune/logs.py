"""The run's CSV logs: metrics.csv (one row per rank trained per step) and eval.csv.

Rows are appended as training goes. On resume a log is cut back to what its checkpoint
saw, so the rows of a killed run's last steps (and a half-written last line) go and the
resumed run's rows follow on exactly as an uninterrupted run's would.
"""

from __future__ import annotations

import csv
from pathlib import Path

from nsn_cli.project.files import atomic_write_text, disk_full_error, is_disk_full

METRICS_FILE, EVAL_FILE = "metrics.csv", "eval.csv"
METRIC_COLUMNS = ("step", "rank", "loss", "distill", "weight", "lr", "tokens_per_s")


class CsvLog:
    """An append-only CSV log; on resume it is cut back to what the checkpoint saw."""

    def __init__(self, path: Path, columns: tuple[str, ...]):
        self.path, self.columns = path, columns

    def start(self, keep_below: int | None) -> None:
        """A new file (keep_below None), or keep only rows with step < keep_below.

        Rows of a killed run's steps after its checkpoint (and a half-written last line)
        go, so the resumed run's rows follow on exactly.
        """
        rows = []
        if keep_below is not None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    if None not in row.values() and row["step"].isdigit() \
                            and int(row["step"]) < keep_below:
                        rows.append(row)
        text = [",".join(self.columns)] + [",".join(r[c] for c in self.columns) for r in rows]
        atomic_write_text(self.path, "\n".join(text) + "\n")

    def append(self, rows: list[dict]) -> None:
        """Appended in place (not atomically): a kill can cut the last line, which `start`
        drops on resume."""
        try:
            with open(self.path, "a", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.columns, lineterminator="\n")
                writer.writerows({c: fmt(row.get(c, "")) for c in self.columns} for row in rows)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.path) from None
            raise


def fmt(value) -> str:
    return f"{value:.9g}" if isinstance(value, float) else str(value)


def metric_rows(report) -> list[dict]:
    return [{"step": report.step, "rank": rank, "loss": loss, "distill": report.distill[rank],
             "weight": report.weights[rank], "lr": report.lr,
             "tokens_per_s": report.tokens_per_s} for rank, loss in report.losses.items()]


def eval_rows(step: int, results: dict[float, dict]) -> list[dict]:
    return [{"step": step, "rank": rank, **metrics} for rank, metrics in results.items()]
