"""The convert stage: load a pretrained model, nest its linear layers, write the project."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from nsn_cli.nested.allocation import ALLOCATIONS, build_global
from nsn_cli.project.allocation_file import ALLOCATION_FILE, write_allocation
from nsn_cli.nested.budget import cost_table
from nsn_cli.stages.config import ConvertConfig, to_dict
from nsn_cli.nested.decompose import METHODS
from nsn_cli.nested.state import nested_state
from nsn_cli.errors import UsageError
from nsn_cli.project.loading import TASKS, load_source, save_model, storage_dtype
from nsn_cli.project.manifest import MODEL_DIR, write_manifest
from nsn_cli.project.files import file_record, folder_records
from nsn_cli.project.lock import ensure_empty_target
from nsn_cli.project.provenance import fingerprint
from nsn_cli.project.staging import staging_dir
from nsn_cli.nested.surgery import ModuleSpec, nest_model, plan, untie_head


@dataclass
class ConvertResult:
    specs: list[ModuleSpec]
    summary: dict
    out_dir: Path | None  # None for a dry run


def validate(cfg: ConvertConfig) -> None:
    """Everything checkable before loading a model, so bad flags fail in milliseconds."""
    if cfg.task is not None and cfg.task not in TASKS:
        raise UsageError(f"--task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    if cfg.svd not in METHODS:
        raise UsageError(f"--svd must be one of {', '.join(METHODS)}, got {cfg.svd!r}")
    if cfg.max_rank is not None and cfg.max_rank < 1:
        raise UsageError(f"--max-rank must be at least 1, got {cfg.max_rank}")
    if cfg.max_rank_fraction is not None and not 0 < cfg.max_rank_fraction <= 1:
        raise UsageError(f"--max-rank-fraction must be in (0, 1], got {cfg.max_rank_fraction}")
    if cfg.allocation not in ALLOCATIONS:
        raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, "
                         f"got {cfg.allocation!r}")
    if cfg.calib_samples < 1 or cfg.calib_seq_len < 1:
        raise UsageError("--calib-samples and --calib-seq-len must be at least 1")
    storage_dtype(cfg.dtype)
    if cfg.num_labels is not None and cfg.num_labels < 2:
        raise UsageError(f"--num-labels must be at least 2, got {cfg.num_labels}")
    if not cfg.dry_run:
        ensure_empty_target(Path(cfg.out_dir), cfg.force)


def convert_model(model: nn.Module, targets: str = "all", max_rank: int | None = None,
                  max_rank_fraction: float | None = None, svd: str = "auto",
                  factor_fn=None, on_layer: Callable | None = None,
                  calib_batches: list[dict] | None = None,
                  allocation: str = "auto", nest_head: bool = False) -> list[ModuleSpec]:
    """Nest `model`'s target layers in place (the library entry point); returns the specs.

    With `calib_batches` (dicts of input_ids / attention_mask) layers are factored by
    activation-aware SVD; `allocation="global"` attaches a nested global ordering that
    `set_budget` then follows ("auto": global when calibrated, else uniform).
    `nest_head` nests the LM head too, giving it its own copy of a tied embedding.
    """
    if nest_head:
        untie_head(model)
    specs = plan(model, targets, max_rank, max_rank_fraction, nest_head)
    nest_planned(model, specs, svd, factor_fn, on_layer, calib_batches, allocation)
    return specs


def nest_planned(model: nn.Module, specs: list[ModuleSpec], svd: str = "auto",
                 factor_fn=None, on_layer: Callable | None = None,
                 calib_batches: list[dict] | None = None, allocation: str = "auto") -> None:
    """Decompose the planned layers (head already untied if it is nested) and attach the
    allocation: the part of `convert_model` after planning."""
    from nsn_cli.nested.calibrate import iterate, nest_activation_aware

    energies = None
    if calib_batches is not None:
        energies = nest_activation_aware(model, specs, iterate(calib_batches), on_layer=on_layer)
    else:
        nest_model(model, specs, svd, factor_fn=factor_fn, on_layer=on_layer)
    cost_table(model, refresh=True)
    if resolve_allocation(allocation, calib_batches is not None) == "global":
        build_global(model, energies, calib_batches)


def convert(cfg: ConvertConfig, on_start: Callable[[int], None] | None = None,
            on_layer: Callable | None = None) -> ConvertResult:
    """Run the stage: load, plan, decompose layer by layer, write DIR atomically."""
    validate(cfg)
    model, tokenizer, task, source = load_source(cfg.model, cfg.task, cfg.revision,
                                                 cfg.trust_remote_code, cfg.num_labels,
                                                 cfg.dtype)
    before = model_stats(model)  # the source model: counted before any untying
    if cfg.nest_head:
        untie_head(model)
    specs = plan(model, cfg.targets, cfg.max_rank, cfg.max_rank_fraction, cfg.nest_head)
    if cfg.dry_run:
        return ConvertResult(specs, {"layers": len(specs), **before}, None)
    batches = None
    if cfg.calib:
        from nsn_cli.stages.calibration import calibration_batches

        batches = calibration_batches(
            cfg.calib, tokenizer, task, cfg.calib_samples, cfg.calib_seq_len,
            vocab_size=model.get_input_embeddings().num_embeddings)
    if on_start is not None:
        on_start(len(specs))
    nest_planned(model, specs, cfg.svd, on_layer=on_layer, calib_batches=batches,
                 allocation=cfg.allocation)
    allocation = resolve_allocation(cfg.allocation, batches is not None)
    summary = {"layers": len(specs), **before, **nested_stats(model)}
    out = Path(cfg.out_dir)
    with staging_dir(out, replace=cfg.force) as tmp:
        save_model(model, tokenizer, tmp / MODEL_DIR)
        from nsn_cli.stages.model_card import write_card

        write_card(tmp / MODEL_DIR, {"source": source, "task": task,
                                     "stages": {"convert": {"config": to_dict(cfg)}}}, "project")
        outputs = folder_records(tmp / MODEL_DIR, tmp)
        allocation = {"method": allocation}
        settings = nested_state(model).settings
        if settings is not None:
            write_allocation(tmp / ALLOCATION_FILE, settings.names, settings.order,
                             settings.criterion)
            record = file_record(tmp / ALLOCATION_FILE, tmp)
            outputs.append(record)
            allocation.update(criterion=settings.criterion, path=record["path"],
                              sha256=record["sha256"])
        manifest = {
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            # What the model (and calibration data, below) are, so a later reader of
            # nsn.json (profile --baseline) can tell they are still what was used.
            "source": {**source, "fingerprint": fingerprint(cfg.model)}, "task": task,
            "decomposition": decomposition_record(cfg, batches),
            "allocation": allocation,
            "modules": [s.to_json() for s in specs],
            "stages": {"convert": {"config": to_dict(cfg), "outputs": outputs,
                                   "summary": summary}},
        }
        write_manifest(tmp, manifest)
    return ConvertResult(specs, summary, out)


def resolve_allocation(allocation: str, calibrated: bool) -> str:
    """`auto` is global where it was measured to win (with calibration), else uniform."""
    if allocation == "auto":
        return "global" if calibrated else "uniform"
    return allocation


def decomposition_record(cfg: ConvertConfig, batches: list[dict] | None) -> dict:
    """How the factors were made: plain SVD, or whitened SVD on which calibration data."""
    if batches is None:
        return {"method": "svd", "svd": cfg.svd, "split": "balanced"}
    from nsn_cli.nested.decompose import DAMPING

    return {"method": "whitened-svd", "split": "balanced-per-component", "damping": DAMPING,
            "calibration": {"data": cfg.calib, "split": "train",
                            "fingerprint": fingerprint(cfg.calib),
                            "rows": sum(len(b["input_ids"]) for b in batches),
                            "tokens": int(sum(b["attention_mask"].sum() for b in batches)),
                            "seq_len": cfg.calib_seq_len}}


def model_stats(model: nn.Module) -> dict:
    table = cost_table(model, refresh=True)
    params = sum(p.numel() for p in model.parameters())
    return {"params_before": params, "flops_per_token_dense": table.dense_flops()}


def nested_stats(model: nn.Module) -> dict:
    """Parameters after surgery and FLOPs/token at full rank and at rank 1 everywhere (the
    floor: what no budget goes below, because un-nested layers and attention stay)."""
    table = cost_table(model)
    return {"params_after": sum(p.numel() for p in model.parameters()),
            "flops_per_token_full_rank": table.flops(),
            "flops_per_token_floor": table.flops({name: 1 for name in table.nested})}
