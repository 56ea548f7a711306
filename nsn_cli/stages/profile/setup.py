"""Everything `nsn profile` settles before measuring: flags, device, data, the baseline.

Bad input fails here, before any model is loaded where possible, with one clear line.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import torch

from nsn_cli.stages.config import ConvertConfig, DataOptions, ProfileConfig
from nsn_cli.project.data import pad_batch
from nsn_cli.errors import ModelError, ProjectError, UsageError
from nsn_cli.stages.runtime import resolve_device
from nsn_cli.text import parse_fractions
from nsn_cli.project.provenance import from_file, recorded_input

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NO_BASELINE = "run profile without --baseline"
DATA_FIELDS = tuple(f.name for f in fields(DataOptions))


# ---------------------------------------------------------------- resolving the run

def validate(cfg: ProfileConfig) -> None:
    """Flag checks that need no model, so bad input fails in milliseconds."""
    if cfg.budgets and cfg.rank_fractions:
        raise UsageError("give --budgets or --rank-fractions, not both")
    for flag, values in (("--budgets", cfg.budgets), ("--rank-fractions", cfg.rank_fractions)):
        parse_fractions(values, flag)
    for flag, value, low in (("--batch-size", cfg.batch_size, 1), ("--repeats", cfg.repeats, 1),
                             ("--warmup-passes", cfg.warmup_passes, 0), ("--seq-len", cfg.seq_len, 2),
                             ("--max-samples", cfg.max_samples, 1), ("--threads", cfg.threads, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if cfg.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    resolve_device(cfg.device)


def resolve_data(cfg: ProfileConfig, manifest: dict
                 ) -> tuple[ProfileConfig, int, str | None, bool]:
    """Fill unset data flags from the finetune stage (same data, same held-out carve).

    Returns the resolved config, the seed of the held-out carve, when the data path
    came from nsn.json a note naming it for the user, and whether the data is
    finetune's. Finetune's settings are inherited only when --data is unset or names the
    same data; a data path inherited from the file is first checked against the
    fingerprint finetune recorded (provenance.py). Other data is the evaluation set
    itself and is measured whole (`ProfileConfig.data_spec(whole=...)`).
    """
    finetune = manifest["stages"].get("finetune") or {}
    recorded = finetune.get("config") or {}
    inherit = cfg.data is None or cfg.data == recorded.get("data")
    values = {name: getattr(cfg, name) for name in DATA_FIELDS}
    if inherit:
        values = {k: v if v is not None else recorded.get(k) for k, v in values.items()}
    if not values["data"]:
        raise UsageError("no evaluation data: pass --data (the project has no finetune stage "
                         "to take it from)")
    note = None
    if cfg.data is None:
        values["data"], note = recorded_input(
            Path(cfg.project), values["data"], (finetune.get("summary") or {}).get("data_source"),
            "the finetune data", "pass --data to choose the evaluation data yourself")
    seed = recorded.get("seed", 0) if inherit else 0
    return replace(cfg, **values), seed if isinstance(seed, int) else 0, note, inherit


def timing_batch(dataset, batch_size: int, seq_len: int, pad_id: int, device) -> dict:
    """batch_size rows (cycled if the split is smaller), padded to exactly seq_len tokens,
    so the counted FLOPs and the latency are per batch of batch_size × seq_len tokens."""
    rows = [dataset[i % len(dataset)] for i in range(batch_size)]
    batch = pad_batch(rows, pad_id)
    batch.pop("labels", None)
    width = batch["input_ids"].shape[1]
    if width < seq_len:
        pad = seq_len - width
        batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, pad), value=pad_id)
        batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, pad))
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------- the baseline

def resvd(model):
    """Plain truncated SVD of the project's own full-rank weights, in place.

    The baseline for classifiers: convert gave them a fresh, untrained head, so the
    source model's SVD would sit at chance. What a user would try first is to
    finetune dense and truncate the SVD afterwards; at full rank the project *is* a
    finetuned dense model, so re-decomposing it measures exactly that, and the gap to
    the nsn rows is what multi-rank training bought.
    """
    import torch

    from nsn_cli.nested.decompose import svd_factors
    from nsn_cli.nested.surgery import nested_layers

    for layer in nested_layers(model).values():
        A, B = svd_factors(layer.dense_weight(layer.max_rank), layer.max_rank, "exact")
        with torch.no_grad():
            layer.A.copy_(A.to(layer.A.dtype))
            layer.B.copy_(B.to(layer.B.dtype))
    return model


def reconvert(project: Path, manifest: dict, scratch: Path, on_note=lambda line: None) -> Path:
    """Re-run `nsn convert` with the project's recorded settings into `scratch`.

    That is the untrained truncated SVD the project started from; done before any
    measurement, so an unreachable source model fails the run at once. The recorded
    model and calibration data must still be what convert used, and no code of the
    model's own runs, whatever nsn.json says (provenance.py); a local source model is
    named to the user (`on_note`) before it is read.
    """
    from nsn_cli.stages.convert import convert

    saved = from_file((manifest["stages"].get("convert") or {}).get("config") or {})
    known = {f.name for f in fields(ConvertConfig)}
    kwargs = {k: v for k, v in saved.items() if k in known}
    if not kwargs.get("model"):
        raise ProjectError("--baseline: nsn.json records no source model to re-convert")
    kwargs["model"], note = recorded_input(project, kwargs["model"],
                                           manifest["source"].get("fingerprint"),
                                           "the source model", NO_BASELINE)
    if kwargs.get("calib"):
        calibration = (manifest.get("decomposition") or {}).get("calibration") or {}
        recorded_input(project, kwargs["calib"], calibration.get("fingerprint"),
                       "the calibration data", NO_BASELINE)
    if note:
        on_note(note)
    out = Path(scratch) / "baseline"
    kwargs.update(out_dir=str(out), force=True, dry_run=False)
    try:
        convert(ConvertConfig(**kwargs))
    except ModelError as exc:
        why = (f"needs its own Python code, and profile never runs a model's code whatever "
               f"nsn.json records; {NO_BASELINE}") if "--trust-remote-code" in str(exc) \
            else f"is not reachable here ({exc})"
        raise ModelError(f"--baseline re-converts the source model {kwargs['model']!r}, "
                         f"which {why}") from None
    return out
