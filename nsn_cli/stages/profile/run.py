"""The profile stage: measure every point of the compute/quality curve.

For each setting (a FLOPs budget or a rank fraction) on the held-out split: the task
metric (evaluate.py), FLOPs per token (analytic, and counted by FlopCounterMode on one
batch), active parameters, latency per batch, and memory. The dense original model
(every nested layer merged back into one plain layer at full rank) is measured in the
same run as the 1.0 reference; `--baseline` adds plain truncated SVD at the same
settings (of the source model for causal LMs; of the project's own full-rank weights for
classifiers, whose head convert created untrained: see profile_setup.resvd).

The columns of profile.csv are documented in docs/outputs.md ("profile.csv columns").
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from nsn_cli.nested.budget import DEFAULT_SEQ_LEN, apply_ranks, cost_table, set_rank
from nsn_cli.stages.config import ProfileConfig
from nsn_cli.project.data import load_task_data, pad_token_id
from nsn_cli.errors import BudgetError, ProjectError
from nsn_cli.stages.evaluate import EvalResult, batches, evaluate, label_mapping
from nsn_cli.stages.lm_eval_tasks import Harness, prepare, raw_name
from nsn_cli.stages.profile.measure import (activation_peak_bytes, active_weights, counted_flops_per_token,
                      round_robin_times)
from nsn_cli.stages.profile.setup import (DTYPES, reconvert, resolve_data, resvd,
                                          timing_batch, validate)
from nsn_cli.stages.runtime import resolve_device, resolve_seq_len
from nsn_cli.project.manifest import read_manifest
from nsn_cli.project.safety import refuse_symlinks
from nsn_cli.stages.profile.outputs import COLUMN_TYPES, MB, columns_for, run_record, write_outputs
from nsn_cli.stages.profile.points import DEFAULT_BUDGETS, Point, ladder_points, plan_points
from nsn_cli.nested.fixed import fixed_layers
from nsn_cli.nested.surgery import nested_layers
from nsn_cli.nested.transforms import merge_layers

# ---------------------------------------------------------------- measurements

@dataclass
class Bench:
    """What every point is measured on: the held-out batches and one timing batch."""

    task: str
    seq_len: int
    eval_batches: list[dict]
    timing_batch: dict
    label_map: torch.Tensor | None
    warmup: int
    repeats: int
    dense_flops: float = 0.0  # analytic FLOPs/token of the dense original
    dense_counted: float = 0.0
    dense_params: int = 0
    dense_latency: float = 0.0
    eval_result: EvalResult | None = None
    harness: Harness | None = None  # lm-eval tasks scored at every point (--lm-eval-tasks)
    tokenizer: object = None


def measure(model: nn.Module, point: Point, bench: Bench) -> dict:
    """Metric, FLOPs, parameters and memory of `model` at `point` (ranks already applied).

    Latency is timed afterwards for all points together (see `add_latency`).
    """
    result = evaluate(model, bench.eval_batches, bench.task, bench.label_map)
    counted = counted_flops_per_token(model, bench.timing_batch, bench.task)
    activations = activation_peak_bytes(model, bench.timing_batch, bench.task)
    params, weight_bytes = active_weights(model)
    layers = nested_layers(model)
    ranks = [m.rank for m in layers.values()]
    fractions = [m.rank / m.max_rank for m in layers.values()]
    counted_layers = layers or fixed_layers(model)  # a plain model costs the dense FLOPs
    flops = cost_table(model).flops(seq_len=bench.seq_len) if counted_layers \
        else bench.dense_flops
    bench.eval_result = result
    return {"variant": point.variant, "budget": point.budget, "rank_fraction": point.rank_fraction,
            "mean_rank_fraction": sum(fractions) / len(fractions) if fractions else None,
            "min_rank": min(ranks, default=None), "max_rank": max(ranks, default=None),
            "flops_per_token": flops, "flops_fraction": flops / bench.dense_flops,
            "flops_counted_per_token": counted,
            "flops_counted_fraction": counted / (bench.dense_counted or counted),
            "params": params, "params_fraction": params / (bench.dense_params or params),
            **result.metrics,
            "weights_mb": weight_bytes / MB, "activations_mb": activations / MB,
            "peak_memory_mb": (weight_bytes + activations) / MB}


def add_latency(rows: list[dict], times: list[list[float]], dense_times: list[float]) -> None:
    """Fill the latency columns of `rows` from their timings.

    The ratio is the median over rounds of (this row's time / the dense model's time in
    the same round), not a ratio of medians: drift in machine load between rounds then
    lands on both sides of each ratio alike.
    """
    for row, ms in zip(rows, times):
        row.update(latency_ms=statistics.median(ms), latency_ms_min=min(ms),
                   latency_ms_max=max(ms),
                   latency_ratio=statistics.median(t / d for t, d in zip(ms, dense_times)))


# ---------------------------------------------------------------- the stage

@dataclass
class ProfileResult:
    frame: object  # pandas.DataFrame, one row per point, columns as in columns_for(task)
    run: dict
    skipped: list[dict]
    out_dir: Path


def make_bench(cfg: ProfileConfig, model: nn.Module, data, tokenizer, task: str, device,
               harness: Harness | None = None) -> Bench:
    pad_id = pad_token_id(tokenizer)
    return Bench(task, cfg.seq_len, batches(data.eval, cfg.batch_size, pad_id, device),
                 timing_batch(data.eval, cfg.batch_size, cfg.seq_len, pad_id, device),
                 label_mapping(model, data.labels) if task == "seq-cls" else None,
                 cfg.warmup_passes, cfg.repeats, harness=harness, tokenizer=tokenizer)


def score_tasks(lm, bench: Bench, row: dict) -> None:
    """The lm-eval task columns of `row`, when --lm-eval-tasks asked for them."""
    from nsn_cli.stages.lm_eval_tasks import score

    row.update(score(lm, bench.harness, row, raw_name(row)))


def lm_of(model: nn.Module, bench: Bench):
    """One lm-eval model per nn.Module: its ranks change between points, the wrapper not."""
    if bench.harness is None:
        return None
    from nsn_cli.stages.lm_eval_tasks import lm_for

    return lm_for(model, bench.tokenizer, bench.harness)


def measure_dense(model: nn.Module, bench: Bench) -> tuple[nn.Module, dict]:
    """The dense original: every nested layer merged at full rank into its plain class."""
    set_rank(model, fraction=1.0)
    bench.dense_flops = cost_table(model).dense_flops(bench.seq_len)
    dense = merge_layers(model)
    row = measure(dense, Point("dense", None), bench)
    bench.dense_counted, bench.dense_params = row["flops_counted_per_token"], row["params"]
    if bench.harness is not None:
        score_tasks(lm_of(dense, bench), bench, row)
    return dense, row


def measure_points(model: nn.Module, points: list[Point], bench: Bench,
                   on_point: Callable[[str], None]) -> list[dict]:
    rows, lm = [], lm_of(model, bench)
    for point in points:
        apply_ranks(model, point.ranks)
        label = (f"budget {point.budget:g}" if point.budget is not None
                 else f"rank fraction {point.rank_fraction:g}")
        rows.append(measure(model, point, bench) | {"ranks": dict(point.ranks),
                                                    "also": point.also})
        if lm is not None:
            score_tasks(lm, bench, rows[-1])
        on_point(f"{point.variant} {label}")
    return rows


def time_rows(dense: nn.Module, entries: list, rows: list[dict], bench: Bench, on_point
              ) -> list[float]:
    """Time the dense original and every entry in interleaved rounds, fill the rows'
    latency columns, and return the dense model's own timings."""
    times = round_robin_times([(dense, None)] + entries, bench.timing_batch, bench.task,
                              bench.warmup, bench.repeats,
                              lambda done: on_point(f"timing round {done}"))
    add_latency(rows, times[1:], times[0])
    return times[0]


def profile(cfg: ProfileConfig, on_start: Callable[[int], None] = lambda total: None,
            on_point: Callable[[str], None] = lambda label: None,
            on_note: Callable[[str], None] = lambda line: None) -> ProfileResult:
    """Run the stage: measure every point, write DIR/profile/, record the run in nsn.json.

    The project's writer lock is held throughout, so the weights cannot change (a
    finetune finishing) between the points of one profile.
    """
    from nsn_cli.project.lock import project_lock

    validate(cfg)
    project = Path(cfg.project)
    manifest = read_manifest(project)
    refuse_symlinks(project, "profile")  # before minutes of measuring, not at the write
    harness = prepare(cfg, manifest["task"])  # a missing extra or task fails before loading
    cfg, seed, note, inherited = resolve_data(cfg, manifest)
    with project_lock(project, "nsn profile"), \
            tempfile.TemporaryDirectory(prefix="nsn-profile-") as scratch:
        if note:  # a path from nsn.json, about to be read: the user sees which
            on_note(note)
        baseline = None
        if cfg.baseline:  # classifiers: re-SVD of the project itself (see profile_setup.resvd)
            baseline = project if manifest["task"] == "seq-cls" else \
                reconvert(project, manifest, Path(scratch), on_note)
        with cpu_threads(cfg.threads):
            return profile_locked(cfg, (seed, inherited), project, manifest, baseline,
                                  on_start, on_point, harness)


@contextlib.contextmanager
def cpu_threads(count: int | None):
    """torch's CPU thread count set to `count` (if given) for the block, then restored."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def profile_locked(cfg: ProfileConfig, carve: tuple[int, bool], project: Path, manifest: dict,
                   baseline: Path | None, on_start, on_point,
                   harness: Harness | None = None) -> ProfileResult:
    import pandas as pd

    from nsn_cli.project.loading import load

    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    model, tokenizer = load(project, device=device, dtype=dtype)
    if tokenizer is None:
        raise ProjectError(f"{project}/model has no tokenizer files: cannot read the data")
    budgets = None if cfg.rank_fractions else list(cfg.budgets or DEFAULT_BUDGETS)
    cfg = replace(cfg, seq_len=resolve_seq_len(cfg.seq_len, model.config, DEFAULT_SEQ_LEN), budgets=budgets)
    task = manifest["task"]
    spec = cfg.data_spec(carve[0], whole=not carve[1] and cfg.eval_fraction is None)
    data = load_task_data(spec, tokenizer, task, cfg.seq_len,
                          vocab_size=model.get_input_embeddings().num_embeddings)
    bench = make_bench(cfg, model, data, tokenizer, task, device, harness)
    points, skipped = plan_points(model, "nsn", budgets, cfg.rank_fractions, cfg.seq_len)
    if not points:
        raise BudgetError(f"no requested setting is measurable: {skipped[0]['reason']}")
    on_start((1 + len(points) + cfg.repeats) * (2 if baseline else 1))
    dense, dense_row = measure_dense(model, bench)
    on_point("dense original")
    rows = measure_points(model, points, bench, on_point)
    dense_times = time_rows(dense, [(model, p.ranks) for p in points], rows, bench, on_point)
    add_latency([dense_row], [dense_times], dense_times)
    bench.dense_latency = dense_row["latency_ms"]
    rows = [dense_row] + rows
    ladder = ladder_points(model, manifest, cfg.seq_len)
    del model  # the dense original stays: the baseline is timed against it too
    if baseline:
        base_model = load(baseline, device=device, dtype=dtype)[0]
        if baseline == project:
            resvd(base_model)
        rows += measure_baseline(base_model, dense, cfg, bench, skipped, on_point)
    columns = columns_for(task) + (harness.columns if harness else [])
    frame = pd.DataFrame([{k: r.get(k) for k in columns} for r in rows],
                         columns=columns).astype(COLUMN_TYPES)
    run = run_record(cfg, device, bench, len(frame), skipped)
    run["baseline"] = None if not baseline else (
        "plain truncated SVD of the project's full-rank weights" if baseline == project
        else "untrained truncated SVD of the source model")
    out = write_outputs(project, cfg, frame, rows, run, skipped, ladder, harness)
    return ProfileResult(frame, run, skipped, out)


def measure_baseline(baseline: nn.Module, dense: nn.Module, cfg: ProfileConfig, bench: Bench,
                     skipped: list[dict], on_point) -> list[dict]:
    points, more_skipped = plan_points(baseline, "baseline", cfg.budgets, cfg.rank_fractions,
                                       cfg.seq_len)
    skipped += more_skipped
    on_point("baseline loaded")
    rows = measure_points(baseline, points, bench, on_point)
    time_rows(dense, [(baseline, p.ranks) for p in points], rows, bench, on_point)
    return rows


