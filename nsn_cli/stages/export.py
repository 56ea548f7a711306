"""Turn one setting of a nested model into a deployable model.

* `factored`: every nested layer keeps only its first r components (A[:r], B[:, :r]),
  so the file is smaller and `nsn_cli.load` gives the same outputs as the project at
  that setting (the export's full rank *is* that setting).
* `merged`: every nested layer becomes a plain dense layer holding B_r A_r, in the
  class it replaced (nn.Linear, or GPT-2's Conv1D with its weight transposed), so
  `AutoModelFor….from_pretrained` loads it with no nsn code at all.

`merge_layers` is also how `nsn profile` builds the dense original model: the nested
model at full rank with each layer merged runs the original architecture.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nsn_cli.nested.budget import DEFAULT_SEQ_LEN, cost_table, set_budget, set_rank
from nsn_cli.stages.config import ExportConfig, to_dict
from nsn_cli.errors import UsageError
from nsn_cli.nested.layer import NestedLinear
from nsn_cli.project.manifest import MODEL_DIR, read_manifest, write_manifest
from nsn_cli.project.files import atomic_write_json, folder_records
from nsn_cli.project.lock import ensure_empty_target
from nsn_cli.project.staging import staging_dir
from nsn_cli.nested.surgery import conv1d_class, nested_layers, replace_module

FORMATS = ("factored", "merged")
EXPORT_INFO = "nsn-export.json"  # provenance next to a merged model (plain JSON)
NSN_ATTRS = ("_nsn_cost", "_nsn_settings", "_nsn_manifest")


# ---------------------------------------------------------------- in-memory transforms

def layer_kinds(model: nn.Module) -> dict[str, str]:
    """name -> 'linear' / 'conv1d': the class each nested layer replaced."""
    manifest = getattr(model, "_nsn_manifest", None) or {}
    return {m["name"]: m.get("kind", "linear") for m in manifest.get("modules", [])}


def dense_layer(layer: NestedLinear, kind: str) -> nn.Module:
    """A plain layer computing exactly what `layer` computes at its active rank."""
    weight = layer.dense_weight().detach()
    bias = layer.bias is not None
    factory = {"dtype": weight.dtype, "device": weight.device}
    if kind == "conv1d":
        dense = conv1d_class()(layer.d_out, layer.d_in)  # Conv1D(nf=d_out, nx=d_in)
        dense.to(**factory)
        with torch.no_grad():
            dense.weight.copy_(weight.T)  # Conv1D stores d_in × d_out
            if bias:  # GPT-2's Conv1D always has one; a bias-free layer keeps zeros
                dense.bias.copy_(layer.bias)
    else:
        dense = nn.Linear(layer.d_in, layer.d_out, bias=bias, **factory)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if bias:
                dense.bias.copy_(layer.bias)
    dense.train(layer.training)
    return dense


def forget_nsn_state(model: nn.Module) -> None:
    """Drop the cost table, settings and manifest cached on a model whose layers changed."""
    for attr in NSN_ATTRS:
        if hasattr(model, attr):
            delattr(model, attr)


def merge_layers(model: nn.Module, kinds: dict[str, str] | None = None,
                 in_place: bool = False) -> nn.Module:
    """The model with every nested layer replaced by its dense B_r A_r at the active rank."""
    kinds = layer_kinds(model) if kinds is None else kinds
    if not in_place:
        model = copy.deepcopy(model)
    for name, layer in nested_layers(model).items():
        replace_module(model, name, dense_layer(layer, kinds.get(name, "linear")))
    forget_nsn_state(model)
    return model


def truncate_layers(model: nn.Module) -> dict[str, int]:
    """Keep only the active rank's components of each nested layer (in place)."""
    ranks = {}
    for name, layer in nested_layers(model).items():
        r = layer.rank
        small = NestedLinear.from_factors(layer.A[:r].detach(), layer.B[:, :r].detach(),
                                          None if layer.bias is None else layer.bias.detach())
        small.train(layer.training)
        replace_module(model, name, small)
        ranks[name] = r
    if hasattr(model, "_nsn_cost"):
        del model._nsn_cost
    return ranks


def apply_setting(model: nn.Module, budget: float | None, rank_fraction: float | None,
                  seq_len: int) -> dict:
    """Put the model at the requested setting; return what was chosen."""
    if (budget is None) == (rank_fraction is None):
        raise UsageError("give exactly one of --budget or --rank-fraction")
    if budget is not None:
        choice = set_budget(model, budget, seq_len=seq_len)
        ranks, fraction = choice.ranks, choice.flops_fraction
    else:
        ranks = set_rank(model, fraction=rank_fraction)
        table = cost_table(model)
        fraction = table.flops(seq_len=seq_len) / table.dense_flops(seq_len)
    return {"ranks": ranks, "flops_fraction": fraction, "seq_len": seq_len}


# ---------------------------------------------------------------- the stage

@dataclass
class ExportResult:
    dest: Path
    format: str
    flops_fraction: float
    params: int
    size_bytes: int
    ranks: dict[str, int]


def validate(cfg: ExportConfig) -> None:
    if cfg.format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if (cfg.budget is None) == (cfg.rank_fraction is None):
        raise UsageError("give exactly one of --budget or --rank-fraction")
    for flag, value in (("--budget", cfg.budget), ("--rank-fraction", cfg.rank_fraction)):
        if value is not None and not 0 < value <= 1:
            raise UsageError(f"{flag} must be in (0, 1], got {value}")
    if cfg.seq_len is not None and cfg.seq_len < 1:
        raise UsageError(f"--seq-len must be at least 1, got {cfg.seq_len}")
    project, dest = Path(cfg.project).resolve(), Path(cfg.dest).resolve()
    if dest == project or project.is_relative_to(dest):
        raise UsageError(f"DEST {cfg.dest} would overwrite the project itself; choose another")
    ensure_empty_target(dest, cfg.force)


def default_seq_len(manifest: dict) -> int:
    """The sequence length budgets were profiled at (FLOPs/token depend on it)."""
    for stage in ("profile", "finetune"):
        seq_len = manifest["stages"].get(stage, {}).get("config", {}).get("seq_len")
        if isinstance(seq_len, int) and seq_len > 0:
            return seq_len
    return DEFAULT_SEQ_LEN


def export(cfg: ExportConfig) -> ExportResult:
    """Write the model at one setting to DEST (atomically) in the chosen format."""
    from nsn_cli.project.loading import load

    validate(cfg)
    manifest = read_manifest(Path(cfg.project))
    model, tokenizer = load(cfg.project)
    seq_len = cfg.seq_len or default_seq_len(manifest)
    chosen = apply_setting(model, cfg.budget, cfg.rank_fraction, seq_len)
    dest = Path(cfg.dest)
    with staging_dir(dest, replace=cfg.force) as tmp:
        if cfg.format == "merged":
            params = write_merged(model, tokenizer, tmp, cfg, chosen)
        else:
            params = write_factored(model, tokenizer, tmp, cfg, chosen, manifest)
    size = sum(p.stat().st_size for p in dest.rglob("*.safetensors"))
    return ExportResult(dest, cfg.format, chosen["flops_fraction"], params, size,
                        chosen["ranks"])


def provenance(cfg: ExportConfig, chosen: dict, manifest: dict) -> dict:
    return {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "from_project": str(Path(cfg.project).resolve()),
            "source": manifest["source"], "format": cfg.format,
            "budget": cfg.budget, "rank_fraction": cfg.rank_fraction,
            "seq_len": chosen["seq_len"], "flops_fraction": chosen["flops_fraction"],
            "ranks": chosen["ranks"]}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied tensors count once


def write_merged(model: nn.Module, tokenizer, tmp: Path, cfg: ExportConfig, chosen: dict) -> int:
    from nsn_cli.project.loading import save_model

    manifest = model._nsn_manifest
    merged = merge_layers(model, in_place=True)
    save_model(merged, tokenizer, tmp)
    atomic_write_json(tmp / EXPORT_INFO, provenance(cfg, chosen, manifest))
    return count_params(merged)


def write_factored(model: nn.Module, tokenizer, tmp: Path, cfg: ExportConfig, chosen: dict,
                   manifest: dict) -> int:
    from nsn_cli.project.loading import save_model

    settings = getattr(model, "_nsn_settings", None)
    ranks = truncate_layers(model)
    save_model(model, tokenizer, tmp / MODEL_DIR)
    out = {k: v for k, v in manifest.items() if k != "stages"}
    out["modules"] = [dict(m, max_rank=ranks[m["name"]]) for m in manifest["modules"]]
    allocation = truncated_allocation(settings, ranks, manifest, tmp)
    if allocation:
        out["allocation"] = allocation
    outputs = folder_records(tmp, tmp)
    out["stages"] = {"export": {"config": to_dict(cfg), "outputs": outputs,
                                "summary": provenance(cfg, chosen, manifest)}}
    write_manifest(tmp, out)
    return count_params(model)


def truncated_allocation(settings, ranks: dict[str, int], manifest: dict, tmp: Path
                         ) -> dict | None:
    """Keep a global ordering usable: its prefix that lies inside the exported ranks.

    A budget setting is a prefix of the ordering, so the components each layer keeps
    are exactly the first r − 1 times it appears there.
    """
    record = manifest.get("allocation") or {}
    if record.get("method") != "global" or not hasattr(settings, "order"):
        return None
    from nsn_cli.project.allocation_file import ALLOCATION_FILE, write_allocation
    from nsn_cli.project.files import sha256_file

    left = {name: ranks[name] - 1 for name in settings.names}
    kept = []
    for index in settings.order.tolist():
        name = settings.names[index]
        if left[name] > 0:
            left[name] -= 1
            kept.append(index)
    rel = record.get("path", ALLOCATION_FILE)
    write_allocation(tmp / rel, settings.names, torch.tensor(kept, dtype=torch.long))
    return dict(record, path=rel, sha256=sha256_file(tmp / rel))
