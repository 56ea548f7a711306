"""What a profile writes: profile.csv (one row per point), profile.json and the run record.

The columns of profile.csv are documented in docs/outputs.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from nsn_cli.project.files import atomic_write_json, atomic_write_text, folder_records
from nsn_cli.project.manifest import mark_unfinished, record_stage
from nsn_cli.project.staging import staging_dir
from nsn_cli.stages.config import ProfileConfig, to_dict
from nsn_cli.stages.evaluate import METRICS
from nsn_cli.stages.lm_eval_tasks import RAW_DIR

SETTING_COLUMNS = ["variant", "budget", "rank_fraction", "mean_rank_fraction", "min_rank",
                   "max_rank", "flops_per_token", "flops_fraction", "flops_counted_per_token",
                   "flops_counted_fraction", "params", "params_fraction"]
COST_COLUMNS = ["latency_ms", "latency_ms_min", "latency_ms_max", "latency_ratio",
                "weights_mb", "activations_mb", "peak_memory_mb"]
MB = 1e6
# Columns that are empty for some rows (the dense one has no budget and no ranks).
COLUMN_TYPES = {"budget": float, "rank_fraction": float, "min_rank": "Int64", "max_rank": "Int64"}


def columns_for(task: str) -> list[str]:
    return SETTING_COLUMNS + list(METRICS[task]) + COST_COLUMNS


def run_record(cfg: ProfileConfig, device, bench, points: int,
               skipped: list[dict]) -> dict:
    """What the numbers were measured on (recorded in nsn.json and profile.json)."""
    return {"device": str(device), "dtype": cfg.dtype, "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len, "samples": bench.eval_result.samples,
            "tokens": bench.eval_result.tokens, "data": cfg.data, "task": bench.task,
            "timing_batch_tokens": int(bench.timing_batch["input_ids"].numel()),
            "repeats": cfg.repeats, "warmup_passes": cfg.warmup_passes, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "points": points, "skipped": len(skipped),
            "dense_flops_per_token": bench.dense_flops, "dense_latency_ms": bench.dense_latency}


def json_safe(value):
    """NaN and ±inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_outputs(project: Path, cfg: ProfileConfig, frame, rows: list[dict], run: dict,
                  skipped: list[dict], ladder: list[dict], harness=None) -> Path:
    """profile.csv and profile.json (and lm-eval's raw results per point), written
    together; then the run goes into nsn.json."""
    out = project / "profile"
    if harness is not None:
        from nsn_cli.stages.lm_eval_tasks import run_record as lm_eval_record

        run["lm_eval"] = lm_eval_record(harness)
    doc = {"run": run, "columns": list(frame.columns), "skipped": skipped, "ladder": ladder,
           "points": rows}
    mark_unfinished(project, "profile")  # a kill before record_stage explains itself
    with staging_dir(out) as tmp:
        atomic_write_text(tmp / "profile.csv", frame.to_csv(index=False))
        atomic_write_json(tmp / "profile.json", json_safe(doc))
        for name, results in (harness.raw.items() if harness is not None else ()):
            (tmp / RAW_DIR).mkdir(exist_ok=True)
            atomic_write_json(tmp / RAW_DIR / name, json_safe(results))
    record_stage(project, "profile", to_dict(cfg), folder_records(out, project), run)
    return out
