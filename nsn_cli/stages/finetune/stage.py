"""The finetune stage: joint multi-rank training that makes every rank of a project good.

Reads `DIR/nsn.json` and `DIR/model/`, trains with `trainer.Trainer`, and writes
`DIR/finetune/` (metrics.csv, eval.csv, checkpoints/) and, at the end, the trained
model over `DIR/model/` (atomically) and the stage record in `nsn.json`. Every input
is checked before anything is written, so a bad flag, file or project leaves the
directory untouched.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nsn_cli.nested.budget import apply_ranks
from nsn_cli.project import checkpoint as ckpt
from nsn_cli.project.files import file_record, folder_records
from nsn_cli.project.lock import project_lock
from nsn_cli.project.manifest import MODEL_DIR, mark_unfinished, read_manifest, record_stage
from nsn_cli.project.safety import count_nonfinite, describe_nonfinite
from nsn_cli.errors import TrainingError
from nsn_cli.project.staging import staging_dir
from nsn_cli.stages.config import FinetuneConfig
from nsn_cli.stages.finetune.distributed import setup
from nsn_cli.stages.finetune.logs import (EVAL_FILE, METRIC_COLUMNS, METRICS_FILE, CsvLog,
                                          eval_rows, metric_rows)
from nsn_cli.stages.finetune.setup import CHECKPOINTS, FINETUNE_DIR, load_inputs, validate
from nsn_cli.stages.finetune.trainer import StepReport, Trainer

HISTORY = 1000  # step reports a result keeps (metrics.csv has them all)


@dataclass
class FinetuneResult:
    project: Path
    summary: dict | None  # None on processes other than 0
    resumed_from: int | None = None
    history: list[StepReport] = field(default_factory=list)  # this run's last HISTORY steps


# ---------------------------------------------------------------- the stage

@dataclass
class Callbacks:
    on_start: Callable[[int, int], None] | None = None  # (total steps, first step)
    on_step: Callable[[StepReport], None] | None = None
    on_eval: Callable[[int, dict], None] | None = None  # (step, {fraction: metrics})

    def call(self, name: str, *args) -> None:
        fn = getattr(self, name)
        if fn is not None:
            fn(*args)


def finetune(cfg: FinetuneConfig, on_start=None, on_step=None, on_eval=None) -> FinetuneResult:
    """Run the stage (all processes under torchrun; only process 0 writes or reports)."""
    ladder = validate(cfg)
    dist = setup(cfg.device, group=cfg.fsdp)
    try:
        lock = project_lock(Path(cfg.project), "nsn finetune") if dist.is_main \
            else contextlib.nullcontext()
        with lock:
            # The others read the project only once process 0 holds it and has put back
            # what a killed run left moved aside (taking the lock does that).
            dist.barrier()
            inputs = load_inputs(cfg, ladder, dist)
            calibrate_first(cfg, inputs, dist)
            trainer = Trainer(cfg, inputs, dist)
            callbacks = Callbacks(on_start, on_step, on_eval) if dist.is_main else Callbacks()
            return run(trainer, callbacks)
    finally:
        dist.close()


def calibrate_first(cfg: FinetuneConfig, inputs, dist) -> None:
    """Whitened SVD and the global ordering on the training data, for a project converted
    without calibration (see calibrate.py); every process computes the same factors,
    process 0 writes them.

    Process 0 decides for all, in a collective that every process reaches only after it
    has read the project (model/ in load_inputs, nsn.json here), so process 0 writes
    nothing before the others have read it: one that read nsn.json after process 0
    recorded the calibration would skip it and train its shard of the old factors."""
    from nsn_cli.project.manifest import read_manifest
    from nsn_cli.stages.finetune import calibrate as calib
    from nsn_cli.stages.finetune.objective import ladder_settings, parse_ladder, resolve_ladder

    manifest = read_manifest(Path(cfg.project))
    needed = inputs.checkpoint is None and calib.needs_calibration(
        manifest, cfg.calibrate, inputs.ladder)
    if not dist.any_(needed and dist.is_main):
        return
    summary = calib.calibrate(inputs.model, inputs.data.train, inputs.pad_id)
    if parse_ladder(cfg.ladder) is None:  # auto: the floor moved with the new factors
        inputs.ladder = resolve_ladder(inputs.model, None)
        inputs.resolved = {**inputs.resolved, "ladder": inputs.ladder}
    inputs.settings = ladder_settings(inputs.model, inputs.ladder)
    inputs.calibration = summary
    if dist.is_main:
        calib.write_calibrated(Path(cfg.project), inputs.model, inputs.tokenizer,
                               inputs.resolved, summary)


def run(trainer: Trainer, callbacks: Callbacks) -> FinetuneResult:
    cfg, inputs, main = trainer.cfg, trainer.inputs, trainer.dist.is_main
    everything = list(range(len(inputs.ladder)))
    # With FSDP every process takes part in evaluations and checkpoints (collectives).
    joins = main or trainer.sharded
    start = trainer.restore(inputs.checkpoint) if inputs.checkpoint else 0
    logs = open_logs(trainer, start) if main else None
    if joins and start == 0:
        before = trainer.evaluate(everything)
        trainer.state["before"] = {str(k): v for k, v in before.items()}
        if main:
            log_eval(trainer, logs, callbacks, 0, before)
    elif joins and is_eval_point(cfg, start):  # its rows were dropped with the later ones
        results = trainer.evaluate(trainer.periodic_eval_indices())
        if main:
            log_eval(trainer, logs, callbacks, start, results)
    callbacks.call("on_start", cfg.steps, start)
    began, history = time.perf_counter(), collections.deque(maxlen=HISTORY)
    for step in range(start, cfg.steps):
        report = trainer.train_step(step)
        trainer.state["tokens"] = trainer.state.get("tokens", 0) + report.tokens
        history.append(report)
        if main:
            logs["metrics"].append(metric_rows(report))
            callbacks.call("on_step", report)
        if joins and is_eval_point(cfg, report.step):
            results = trainer.evaluate(trainer.periodic_eval_indices())
            if main:
                log_eval(trainer, logs, callbacks, report.step, results)
        if joins and cfg.save_every and report.step % cfg.save_every == 0 \
                and report.step < cfg.steps:
            trainer.save(report.step)
    summary = None
    if joins:
        summary = finalize(trainer, logs, callbacks, start, time.perf_counter() - began)
    trainer.dist.barrier()
    return FinetuneResult(Path(cfg.project), summary, start or None, list(history))


def is_eval_point(cfg: FinetuneConfig, step: int) -> bool:
    return bool(cfg.eval_every) and step % cfg.eval_every == 0 and 0 < step < cfg.steps


def open_logs(trainer: Trainer, start: int) -> dict[str, CsvLog]:
    """A fresh run replaces DIR/finetune/; a resumed one keeps what its checkpoint saw."""
    from nsn_cli.stages.evaluate import METRICS

    folder = trainer.dir
    # The logs of an earlier finetune are recorded in nsn.json; they change from here on.
    mark_unfinished(Path(trainer.cfg.project), "finetune", replacing=f"{FINETUNE_DIR}/")
    if start == 0:
        ckpt.reset(folder / CHECKPOINTS)
        shutil.rmtree(folder, ignore_errors=True)
    else:
        ckpt.clean_strays(folder / CHECKPOINTS)
    folder.mkdir(parents=True, exist_ok=True)
    logs = {"metrics": CsvLog(folder / METRICS_FILE, METRIC_COLUMNS),
            "eval": CsvLog(folder / EVAL_FILE, ("step", "rank") + METRICS[trainer.inputs.task])}
    # Metrics of step `start` are in the checkpoint; its eval (if any) is re-run.
    logs["metrics"].start(None if start == 0 else start + 1)
    logs["eval"].start(None if start == 0 else start)
    return logs


def log_eval(trainer: Trainer, logs: dict, callbacks: Callbacks, step: int,
             results: dict[float, dict]) -> None:
    logs["eval"].append(eval_rows(step, results))
    callbacks.call("on_eval", step, results)


def finalize(trainer: Trainer, logs: dict | None, callbacks: Callbacks, start: int,
             seconds: float) -> dict | None:
    """Final checkpoint, final eval at every ladder point, DIR/model/ and the record.

    Process 0 writes DIR/model/ and nsn.json; with FSDP the others take part in the
    checkpoint, the evaluation and the gathering of the whole weights, and return None."""
    from nsn_cli.project.loading import save_model

    cfg, inputs, main = trainer.cfg, trainer.inputs, trainer.dist.is_main
    found = ckpt.find_latest(trainer.dir / CHECKPOINTS) if main else None
    missing = main and (found is None or found.step != cfg.steps)
    # With FSDP process 0 decides for all (the others may not see its files).
    if trainer.dist.any_(missing) if trainer.sharded else missing:
        trainer.save(cfg.steps)
    final = trainer.evaluate(list(range(len(inputs.ladder))))
    apply_ranks(trainer.model, inputs.settings[-1])
    tensors = trainer.final_tensors()
    if not main:
        return None
    log_eval(trainer, logs, callbacks, cfg.steps, final)
    project = Path(cfg.project)
    bad = {n: c for n, t in tensors[0].items() if (c := count_nonfinite(t))}
    if bad:
        raise TrainingError(f"refusing to save the fine-tuned model over {project / MODEL_DIR}: "
                            f"{describe_nonfinite(bad)}; the last good weights on disk are kept")
    mark_unfinished(project, "finetune")  # until record_stage: explains a kill in between
    with staging_dir(project / MODEL_DIR) as tmp:
        save_model(trainer.model, inputs.tokenizer, tmp, tensors=tensors)
        from nsn_cli.stages.model_card import write_card

        write_card(tmp, read_manifest(project), "project",
                   extra={"finetune": inputs.resolved})
    summary = build_summary(trainer, final, start, seconds)
    outputs = folder_records(project / MODEL_DIR, project)
    outputs += [file_record(log.path, project) for log in logs.values()]
    record_stage(project, "finetune", inputs.resolved, outputs, summary)
    return summary


def build_summary(trainer: Trainer, final: dict[float, dict], start: int, seconds: float) -> dict:
    inputs, cfg = trainer.inputs, trainer.cfg
    weights = trainer.weights.weights() if cfg.objective == "uncertainty" else None
    before = trainer.state.get("before", {})
    ranks = [{"fraction": f, "weight": weights[i] if weights else None,
              "before": before.get(str(f)), "after": final[f]}
             for i, f in enumerate(inputs.ladder)]
    return {"steps": cfg.steps, "resumed_from": start or None,
            "train_tokens": int(trainer.state.get("tokens", 0)),
            "seconds_this_run": round(seconds, 2), "objective": cfg.objective,
            "distill": cfg.distill, "ladder": inputs.ladder, "ladder_space": "flops",
            "calibration": inputs.calibration, "head": inputs.head,
            "labels": inputs.data.labels, "data": inputs.data.stats,
            "data_source": inputs.data_source, "ranks": ranks}
