"""Turn one setting of a nested model into a deployable model.

* `factored`: every nested layer is stored in the smallest exact form of the path it
  runs at the setting (nested/fixed.py): the gauge-aligned pair, r·(d_in + d_out − r)
  numbers, below `dense_from` (where fewer bytes than the factors); a plain dense
  weight from there on; its first r factor components otherwise (low ranks, or an
  ill-conditioned block). The manifest names each
  layer's form (`stored`); `nsn_cli.load` gives the same outputs and FLOPs as the
  project at that setting, and the export is fixed at it. `--keep-nested` keeps the
  first r components of every layer instead (A[:r], B[:, :r]; larger above the
  break-even rank), which still switch to lower budgets: the export's full rank *is*
  the setting.
* `merged`: every nested layer becomes a plain dense layer holding B_r A_r, in the
  class it replaced (nn.Linear, or GPT-2's Conv1D with its weight transposed), so
  `AutoModelFor….from_pretrained` loads it with no nsn code at all.

Both are the in-memory transforms of nested/transforms.py, saved.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from nsn_cli.nested.fixed import FORMS as FORMS_STORED, fixed_layers
from nsn_cli.nested.budget import DEFAULT_SEQ_LEN, cost_table, set_budget, set_rank
from nsn_cli.stages.config import ExportConfig, to_dict
from nsn_cli.errors import UsageError
from nsn_cli.nested.state import nested_state
from nsn_cli.nested.surgery import nested_layers
from nsn_cli.nested.transforms import fix_layers, merge_layers, truncate_layers
from nsn_cli.project.manifest import MODEL_DIR, read_manifest, write_manifest
from nsn_cli.project.files import atomic_write_json, folder_records
from nsn_cli.project.lock import ensure_empty_target
from nsn_cli.project.staging import staging_dir

FORMATS = ("factored", "merged")
EXPORT_INFO = "nsn-export.json"  # provenance next to a merged model (plain JSON)


# ---------------------------------------------------------------- the setting

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
    pushed: str | None = None  # the Hub URL, with --push-to-hub
    stored: dict[str, int] | None = None  # factored: layers per stored form


def validate(cfg: ExportConfig) -> None:
    if cfg.format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if cfg.keep_nested and cfg.format != "factored":
        raise UsageError("--keep-nested only applies to --format factored")
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
    if cfg.push_to_hub is not None:
        from nsn_cli.stages.hub import check_repo_id

        check_repo_id(cfg.push_to_hub)
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
    chosen["dense_params"] = dense_params(model)
    with staging_dir(dest, replace=cfg.force) as tmp:
        if cfg.format == "merged":
            params = write_merged(model, tokenizer, tmp, cfg, chosen, manifest)
        else:
            params = write_factored(model, tokenizer, tmp, cfg, chosen, manifest)
    size = sum(p.stat().st_size for p in dest.rglob("*.safetensors"))
    pushed = None
    if cfg.push_to_hub:
        from nsn_cli.stages.hub import push_folder

        pushed = push_folder(dest, cfg.push_to_hub, f"nsn export ({cfg.format})")
    return ExportResult(dest, cfg.format, chosen["flops_fraction"], params, size,
                        chosen["ranks"], pushed, chosen.get("stored"))


def dense_params(model: nn.Module) -> int:
    """Parameters of the dense original: each nested layer counted as its d_out × d_in."""
    total = count_params(model)
    for layer in nested_layers(model).values():
        total += layer.d_in * layer.d_out - layer.A.numel() - layer.B.numel()
    for layer in fixed_layers(model).values():  # exporting an export again
        bias = layer.d_out if layer.bias is not None else 0
        total += layer.d_in * layer.d_out + bias - sum(p.numel() for p in layer.parameters())
    return total


def card(tmp: Path, cfg: ExportConfig, chosen: dict, manifest: dict, params: int) -> None:
    """README.md: the Hub model card of the export (see model_card.py)."""
    from nsn_cli.stages.model_card import write_card

    setting = {"budget": cfg.budget, "rank_fraction": cfg.rank_fraction,
               "seq_len": chosen["seq_len"], "flops_fraction": chosen["flops_fraction"],
               "params": params, "params_fraction": params / chosen["dense_params"]}
    write_card(tmp, manifest, cfg.format, setting, Path(cfg.project),
               extra={"export": to_dict(cfg)})


def provenance(cfg: ExportConfig, chosen: dict, manifest: dict) -> dict:
    return {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "from_project": str(Path(cfg.project).resolve()),
            "source": manifest["source"], "format": cfg.format,
            "budget": cfg.budget, "rank_fraction": cfg.rank_fraction,
            "seq_len": chosen["seq_len"], "flops_fraction": chosen["flops_fraction"],
            "ranks": chosen["ranks"]}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied tensors count once


def write_merged(model: nn.Module, tokenizer, tmp: Path, cfg: ExportConfig, chosen: dict,
                 manifest: dict) -> int:
    from nsn_cli.project.loading import save_model

    merged = merge_layers(model, in_place=True)
    save_model(merged, tokenizer, tmp, plain=True)
    atomic_write_json(tmp / EXPORT_INFO, provenance(cfg, chosen, manifest))
    card(tmp, cfg, chosen, manifest, count_params(merged))
    return count_params(merged)


def write_factored(model: nn.Module, tokenizer, tmp: Path, cfg: ExportConfig, chosen: dict,
                   manifest: dict) -> int:
    from nsn_cli.project.loading import save_model

    if cfg.keep_nested:  # the model's ordering is cut to these ranks too
        forms = {n: ("factors", r) for n, r in truncate_layers(model).items()}
    else:  # a fixed model: no ordering to keep
        forms = fix_layers(model)
    save_model(model, tokenizer, tmp / MODEL_DIR)
    out = {k: v for k, v in manifest.items() if k != "stages"}
    out["modules"] = [stored_entry(m, forms) for m in manifest["modules"]]
    allocation = truncated_allocation(model, manifest, tmp)
    if allocation:
        out["allocation"] = allocation
    if nested_state(model).fixed:  # one setting: no ordering (nor its file) to keep
        out["allocation"] = {"method": "fixed"}
    card(tmp, cfg, chosen, manifest, count_params(model))
    outputs = folder_records(tmp, tmp)
    stored = [m["stored"] for m in out["modules"]]
    counts = {form: stored.count(form) for form in FORMS_STORED}
    chosen["stored"] = counts
    summary = provenance(cfg, chosen, manifest) | {"stored": counts}
    out["stages"] = {"export": {"config": to_dict(cfg), "outputs": outputs, "summary": summary}}
    write_manifest(tmp, out)
    return count_params(model)


def stored_entry(module: dict, forms: dict[str, tuple[str, int]]) -> dict:
    """The export's manifest entry of one layer: its rank and how the file stores it
    (named for every layer, so loading never guesses; an already fixed layer of an
    export being exported again keeps its entry)."""
    entry = dict(module, stored=module.get("stored", "factors"))
    if module["name"] in forms:
        entry["stored"], entry["max_rank"] = forms[module["name"]]
    return entry


def truncated_allocation(model: nn.Module, manifest: dict, tmp: Path) -> dict | None:
    """Keep a global ordering usable: write the truncated model's own (cut) ordering."""
    record = manifest.get("allocation") or {}
    settings = nested_state(model).settings
    if record.get("method") != "global" or settings is None:
        return None
    from nsn_cli.project.allocation_file import ALLOCATION_FILE, write_allocation
    from nsn_cli.project.files import sha256_file

    rel = record.get("path", ALLOCATION_FILE)
    write_allocation(tmp / rel, settings.names, settings.order, settings.criterion)
    return dict(record, path=rel, sha256=sha256_file(tmp / rel))
