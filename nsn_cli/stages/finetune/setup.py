"""What finetune checks and loads before it writes anything: flags, project, model, data.

Every check that can fail on bad input runs here, so a failure leaves the project
directory exactly as it was. Classification projects also get their head matched to
the data's label set (kept, reordered or made afresh, see `prepare_head`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nsn_cli.project import checkpoint as ckpt
from nsn_cli.stages.config import FinetuneConfig, to_dict
from nsn_cli.project.data import TaskData, load_task_data, pad_token_id
from nsn_cli.stages.finetune.distributed import Dist
from nsn_cli.errors import DataError, ModelError, UsageError
from nsn_cli.nested.layer import NestedLinear
from nsn_cli.stages.finetune.objective import (OBJECTIVES, ladder_settings, parse_ladder,
                                               resolve_ladder)
from nsn_cli.project.manifest import MODEL_DIR, fixed_modules, read_manifest
from nsn_cli.stages.runtime import resolve_seq_len
from nsn_cli.project.provenance import fingerprint
from nsn_cli.project.safety import refuse_symlinks

FINETUNE_DIR = "finetune"
CHECKPOINTS = "checkpoints"  # under DIR/finetune/
DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_SEQ_LEN = 256
# Flags that may change between a run and its resume without changing what is trained.
RESUME_FREE = {"project", "resume", "eval_every", "eval_samples", "save_every",
               "keep_checkpoints", "device", "fsdp",
               "calibrate"}  # calibration is done by the time a resume could change it


@dataclass
class Inputs:
    """Everything a run needs, loaded and checked."""

    model: nn.Module
    tokenizer: object
    task: str
    seq_len: int
    data: TaskData
    ladder: list[float]
    settings: list[dict[str, int]]  # per-layer ranks of each ladder point
    pad_id: int
    resolved: dict  # the config with defaults resolved (recorded in nsn.json)
    checkpoint: ckpt.Checkpoint | None
    head: str | None  # seq-cls: kept / reordered / new
    data_source: dict | None = None  # fingerprint of --data (project/provenance.py)
    calibration: dict | None = None  # set when this run calibrated the project first

    def forward_args(self, batch: dict) -> dict:
        args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.task == "causal-lm":
            args["use_cache"] = False  # nothing is generated; the cache only costs memory
        return args


# ---------------------------------------------------------------- flags

def validate(cfg: FinetuneConfig) -> list[float] | None:
    """Check every flag (no I/O); returns the parsed ladder (None: auto)."""
    if not cfg.project:
        raise UsageError("a project directory is required")
    if not cfg.data:
        raise UsageError("--data is required (a hub dataset name, a local file or directory)")
    for name in ("steps", "batch_size", "grad_accum", "ranks_per_step", "eval_samples",
                 "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, "
                             f"got {getattr(cfg, name)}")
    for name in ("eval_every", "save_every", "weight_decay", "clip", "hidden_distill"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative")
    if not (cfg.lr > 0 and cfg.scale_lr > 0):
        raise UsageError("--lr and --scale-lr must be positive")
    if not 0 <= cfg.warmup < 1:
        raise UsageError(f"--warmup is a fraction of --steps in [0, 1), got {cfg.warmup}")
    if not 0 < cfg.eval_fraction < 1:
        raise UsageError(f"--eval-fraction must be in (0, 1), got {cfg.eval_fraction}")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise UsageError(f"--max-samples must be at least 1, got {cfg.max_samples}")
    if cfg.seq_len is not None and cfg.seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {cfg.seq_len}")
    if cfg.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.objective not in OBJECTIVES:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, "
                         f"got {cfg.objective!r}")
    return parse_ladder(cfg.ladder)


def resolved_config(cfg: FinetuneConfig, ladder: list[float], seq_len: int) -> dict:
    return {**to_dict(cfg), "ladder": ladder, "seq_len": seq_len}


# ---------------------------------------------------------------- loading

def load_inputs(cfg: FinetuneConfig, ladder: list[float] | None, dist: Dist) -> Inputs:
    project = Path(cfg.project)
    manifest = read_manifest(project)
    fixed = fixed_modules(manifest)
    if fixed:
        raise UsageError(f"{project} is a factored export fixed at its setting ({len(fixed)} "
                         f"layers, e.g. {fixed[0]}, stored as gauge-aligned pairs or dense "
                         "weights): finetune the project it came from, or export it with "
                         "--keep-nested")
    refuse_symlinks(project, MODEL_DIR, FINETUNE_DIR)  # a fresh run deletes finetune/
    checkpoint = None
    if cfg.resume:
        checkpoint = ckpt.find_latest(project / FINETUNE_DIR / CHECKPOINTS)
    model, tokenizer = load_model(project, manifest, checkpoint)
    if ladder is None and checkpoint is not None:
        # `auto` resumes on the ladder its run resolved: the floor it starts from moves a
        # little with the weights (calibration, training), and a resume must not.
        ladder = (checkpoint.state.get("config") or {}).get("ladder")
    ladder = resolve_ladder(model, ladder)
    task = manifest["task"]
    seq_len = resolve_seq_len(cfg.seq_len, model.config, DEFAULT_MAX_SEQ_LEN)
    spec = cfg.data_spec(cfg.seed)
    data = load_task_data(spec, tokenizer, task, seq_len,
                          vocab_size=model.get_input_embeddings().num_embeddings)
    if cfg.batch_size % dist.world:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the "
                         f"{dist.world} processes")
    pad_id = pad_token_id(tokenizer)
    head = None
    if task == "seq-cls":
        head = prepare_head(model, data.labels, cfg.seed)
        if model.config.pad_token_id is None:  # decoders find the last token through it
            model.config.pad_token_id = pad_id
    resolved = resolved_config(cfg, ladder, seq_len)
    if checkpoint is not None:
        check_resumable(checkpoint, resolved, len(data.train))
    # A resume trains the very ranks its run chose: what a budget buys depends a little on
    # the weights (a layer's gauge-aligned cost), and those have changed since.
    settings = (checkpoint.state.get("ladder_ranks") if checkpoint is not None else None) \
        or ladder_settings(model, ladder)
    return Inputs(model, tokenizer, task, seq_len, data, ladder, settings,
                  pad_id, resolved, checkpoint, head, fingerprint(cfg.data))


def load_model(project: Path, manifest: dict, checkpoint: ckpt.Checkpoint | None):
    """The project's model; when resuming, its architecture comes from the checkpoint.

    Rebuilding from the checkpoint (weights are restored next) means a resume never
    depends on DIR/model/, which a killed run may have been replacing.
    """
    from nsn_cli.project.loading import load

    if checkpoint is None:
        return load(project)
    from transformers import AutoTokenizer

    from nsn_cli.project.allocation_file import load_into
    from nsn_cli.project.loading import empty_model
    from nsn_cli.nested.surgery import ModuleSpec, build_shells

    model = empty_model(manifest["task"], ckpt.read_config(checkpoint))
    build_shells(model, [ModuleSpec(**spec) for spec in manifest["modules"]])
    load_into(model, project, manifest)
    saved = checkpoint.path / ckpt.TOKENIZER_DIR
    where = saved if saved.is_dir() else project / MODEL_DIR
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer in {where}: {exc}") from None
    return model, tokenizer




def check_resumable(checkpoint: ckpt.Checkpoint, resolved: dict, train_rows: int) -> None:
    """A resume must train what the checkpoint's run trained, or it would not continue it."""
    saved = checkpoint.state.get("config", {})
    changed = [k for k in resolved if k not in RESUME_FREE and saved.get(k) != resolved[k]]
    if changed:
        k = changed[0]
        raise UsageError(f"{checkpoint.path} was made with --{k.replace('_', '-')} {saved.get(k)!r}"
                         f", not {resolved[k]!r}; resume with the same settings or start a new "
                         "run without --resume")
    if checkpoint.state.get("train_rows") != train_rows:
        raise DataError(f"the training data has {train_rows} rows but had "
                        f"{checkpoint.state.get('train_rows')} when {checkpoint.path} was saved")


# ---------------------------------------------------------------- classification head

def prepare_head(model: nn.Module, labels: list[str], seed: int) -> str:
    """Match the classifier to the data's labels; the config records them as id2label.

    Same names: kept (rows reordered to the data's label order if needed). Default names
    (LABEL_0 …) and as many classes: kept. Otherwise a new head, initialised from `seed`.
    """
    config = model.config
    if len(labels) < 2:  # data.label_names refuses such data; never make a 1-output head
        raise DataError(f"{len(labels)} classes: a classifier needs at least two")
    # Labels are class ids: a config saying "regression" or "multi_label_classification"
    # would make transformers' own loss treat them as numbers or as sets.
    config.problem_type = "single_label_classification"
    names = [str(config.id2label[i]) for i in range(config.num_labels)]
    if names == labels:
        return "kept"
    name, head = find_head(model, len(names))
    if sorted(names) == sorted(labels):
        order = torch.tensor([names.index(label) for label in labels])
        with torch.no_grad():
            head.weight.copy_(head.weight[order])
            if head.bias is not None:
                head.bias.copy_(head.bias[order])
        outcome = "reordered"
    elif all(n == f"LABEL_{i}" for i, n in enumerate(names)) and len(names) == len(labels):
        outcome = "kept"
    else:
        model.set_submodule(name, fresh_head(head, len(labels), config, seed))
        outcome = "new"
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.num_labels = len(labels)
    return outcome


def find_head(model: nn.Module, outputs: int) -> tuple[str, nn.Linear]:
    """The last linear layer with one output per class (classifier, score, out_proj …)."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, NestedLinear))
             and (m.out_features if isinstance(m, nn.Linear) else m.d_out) == outputs]
    if not found:
        raise ModelError(f"cannot find the classification head (a linear layer with {outputs} "
                         "outputs) to match the data's labels")
    name, head = found[-1]
    if isinstance(head, NestedLinear):
        raise UsageError(f"the classification head {name} is nested; convert the model without "
                         "it in --targets to train it on a different label set")
    return name, head


def fresh_head(old: nn.Linear, classes: int, config, seed: int) -> nn.Linear:
    head = nn.Linear(old.in_features, classes, bias=old.bias is not None,
                     dtype=old.weight.dtype, device=old.weight.device)
    gen = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", None) or 0.02
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
        if head.bias is not None:
            head.bias.zero_()
    return head
