"""One dataclass per command. Field docs are the single source of help text.

The CLI generates each command's options from these fields (cli/options.py: default,
help, and the choices of a `Literal` type), recipes validate their keys against them,
and each stage records its resolved config in `nsn.json` (plain strings and numbers).
Only the standard library and project/data.py's constants are imported here, so
`nsn --help` stays instant.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from typing import Literal, Optional

from nsn_cli.project.data import ALIASES, BUILDERS, DataSpec

Task = Literal["causal-lm", "seq-cls"]
# Any torch device works; --help lists the usual ones (a device is not a closed choice).
DEVICES = "[auto|cpu|cuda|cuda:N]"


def opt(default, help: str, unset: str | None = None, **extra):
    """A config field with its help text attached; `unset` says what None means."""
    text = help
    if unset:  # "Held-out split." -> "Held-out split (default: ...)."
        stem, dot = (help[:-1], ".") if help.endswith(".") else (help, "")
        text = f"{stem} (default: {unset}){dot}"
    metadata = {"help": text, "about": help, "unset": unset, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def project_dir(made_by: str = ""):
    """The PROJECT argument every command but convert takes."""
    return opt(None, f"Project directory{f' ({made_by})' if made_by else ''}.")


def device_option(verb: str):
    """--device, the same flag wherever a stage runs a model."""
    return opt("auto", f"Device to {verb} on (auto: cuda when available).", metavar=DEVICES)


@dataclass
class ConvertConfig:
    model: str = opt(None, "Hub id (e.g. gpt2) or local directory of the pretrained model.",
                     path=False)  # taken as typed: './gpt2' is a directory, 'gpt2' a hub id
    out_dir: str = opt(None, "Project directory to create.")
    task: Task | None = opt(None, "The task; guessed from the model when omitted.")
    targets: str = opt("all", "Layers to nest: all (every linear in the blocks), attn, mlp, "
                              "or a regex on module names.")
    nest_head: bool = opt(False, "Nest the LM head too; a head tied to the input embedding "
                                 "gets its own copy (vocab × hidden more parameters). Lowers "
                                 "the budget floor of models whose head is a large share "
                                 "of FLOPs, such as GPT-2.")
    max_rank: int | None = opt(None, "Cap on R, the largest rank kept per layer.")
    max_rank_fraction: float | None = opt(None, "Cap on R as a fraction of min(d_in, d_out).")
    svd: Literal["auto", "exact", "randomized"] = opt(
        "auto", "SVD method (auto: randomized when few components are kept of a large layer).")
    calib: str | None = opt(None, "Calibration data (anything --data takes): factor each layer "
                                  "by activation-aware SVD on its real inputs.")
    calib_samples: int = opt(128, "Rows (or LM blocks) of the calibration data to use.")
    calib_seq_len: int = opt(128, "Tokens per calibration row or LM block.")
    allocation: Literal["auto", "uniform", "global"] = opt(
        "auto", "Rank allocation across layers: uniform (the same fraction "
                                  "of R everywhere), global (one nested ordering of all "
                                  "components by output energy per FLOP, weighted by measured "
                                  "layer sensitivity), or auto: global with --calib, else "
                                  "uniform.")
    num_labels: int | None = opt(None, "Classes of a new classification head (seq-cls).")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = opt(False, "Allow the model repository to run its own code.")
    force: bool = opt(False, "Replace OUT_DIR if it exists and is not empty.")
    dry_run: bool = opt(False, "List the layers that would be nested; write nothing.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "Dtype the project stores: auto (the source's, e.g. bfloat16 for "
                             "a bf16 checkpoint), float32, bfloat16 or float16. Factors are "
                             "computed in float32 or wider either way.")


@dataclass
class DataOptions:
    """Which data, which rows of it and how long a row is: the data flags of finetune, and
    of profile, where each is unset by default, meaning "what finetune used" (see
    `inherited_from_finetune`). The defaults are DataSpec's (project/data.py)."""

    data: str | None = opt(None, f"Training data: a hub dataset name (aliases: {', '.join(ALIASES)}), "
                                 f"a local {'/'.join(BUILDERS)} file, or a directory of such "
                                 "files.")
    text_column: str = opt(DataSpec.text_column, "Column holding the text.")
    label_column: str = opt(DataSpec.label_column, "Column holding the class (seq-cls); '' "
                                                   "ignores a label column in causal-LM data.")
    split: str = opt(DataSpec.split, "Split to train on.")
    eval_split: str | None = opt(None, "Held-out split.", unset="validation/valid/test if the "
                                 "data has one, else --eval-fraction carved from --split")
    eval_fraction: float = opt(DataSpec.eval_fraction, "Fraction held out (with --seed) when "
                                                       "there is no evaluation split.")
    max_samples: int | None = opt(None, "Use at most this many rows of each split.")
    seq_len: int | None = opt(None, "Tokens per LM block / max tokens per row; FLOPs are per "
                                    "token at this length.",
                              unset="the model's context, at most 256")

    def data_spec(self, seed: int, whole: bool = False) -> DataSpec:
        """The loader's view of these options (an unset one takes DataSpec's default);
        `whole`: data without an evaluation split is measured whole, not carved."""
        names = [f.name for f in fields(DataSpec) if f.name not in ("seed", "whole")]
        chosen = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        return DataSpec(**chosen, seed=seed, whole=whole)


def inherited_from_finetune(options, about: dict[str, str], unset: dict[str, str]):
    """`options`' fields, each defaulting to None: "the value the finetune stage used",
    else the field's own default (or `unset[name]`). `about` rewords a field whose
    meaning differs in the inheriting stage."""
    hints = typing.get_type_hints(options)
    specs = []
    for f in fields(options):
        fallback = unset.get(f.name) or f.metadata["unset"] or (
            None if f.default is None else repr(f.default))
        specs.append((f.name, Optional[hints[f.name]],
                      opt(None, about.get(f.name, f.metadata["about"]),
                          unset="finetune's" + (f", else {fallback}" if fallback else ""))))
    cls = make_dataclass(f"Inherited{options.__name__}", specs, bases=(options,))
    cls.__module__ = __name__
    return cls


ProfileData = inherited_from_finetune(
    DataOptions, unset={"seq_len": "the model's context, at most 128"},
    about={"data": "Evaluation data (anything finetune's --data takes).",
           "split": "Split the held-out part is carved from when the data has no "
                    "evaluation split.",
           "eval_split": "Held-out split to measure on.",
           "eval_fraction": "Fraction held out when there is no evaluation split (data "
                            "named here, not finetune's, is measured whole without it).",
           "max_samples": "Use at most this many held-out rows."})


@dataclass
class ProfileConfig(ProfileData):
    project: str = project_dir()
    batch_size: int = opt(8, "Rows (LM: blocks) per batch, for the metric and the latency.")
    budgets: list[float] | None = opt(None, "FLOPs budgets to measure, as fractions of the "
                                            "dense model.", unset="13 points from 0.05 to 1")
    rank_fractions: list[float] | None = opt(None, "Measure these fractions of R in every "
                                                   "layer instead of --budgets.")
    baseline: bool = opt(False, "Also measure untrained truncated SVD at the same settings "
                                "(re-converts the source model, which must be reachable).")
    repeats: int = opt(5, "Timed forward passes per point (the median is reported).")
    warmup_passes: int = opt(2, "Untimed forward passes before timing each point.")
    device: str = device_option("measure")
    dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "Dtype of the weights and activations measured.")
    threads: int | None = opt(None, "CPU threads to measure with; latency ratios depend on "
                                    "it, so use what you deploy with.", unset="torch's choice")
    lm_eval_tasks: str | None = opt(None, "lm-evaluation-harness tasks (comma-separated) to run "
                                          "at every point and on the dense original; each "
                                          "metric becomes a profile.csv column TASK/METRIC "
                                          "(needs nsn-cli[lm-eval]).")
    lm_eval_include: str | None = opt(None, "Directory of your own lm-eval task YAML files "
                                            "(lm-eval's --include_path).")
    lm_eval_limit: float | None = opt(None, "At most this many documents per lm-eval task (below "
                                            "1: that fraction), as lm-eval's --limit.")
    lm_eval_fewshot: int | None = opt(None, "Few-shot examples per lm-eval prompt (lm-eval's "
                                            "--num_fewshot; default: each task's own).")


@dataclass
class FrontierConfig:
    project: str = project_dir("profiled with nsn profile")
    budget: float | None = opt(None, "Print the best measured setting whose FLOPs fraction is "
                                     "at most this.")
    plot: bool = opt(False, "Write frontier/frontier.png and .svg.")
    metric: str | None = opt(None, "Metric to optimise: perplexity or nll (causal-lm), accuracy "
                                   "or macro_f1 (seq-cls), or an lm-eval column TASK/METRIC "
                                   "of the profile; default: perplexity / accuracy.")


@dataclass
class ExportConfig:
    project: str = project_dir()
    dest: str = opt(None, "Directory to write the exported model to.")
    budget: float | None = opt(None, "FLOPs budget as a fraction of the dense model.")
    rank_fraction: float | None = opt(None, "Fraction of R in every layer (instead of --budget).")
    format: Literal["factored", "merged"] = opt("factored", "factored (nsn_cli.load; each layer "
        "in its smallest exact form: gauge-aligned pair, dense weight or first r factors) or "
        "merged (plain HF model, dense B_r A_r; loads with from_pretrained).")
    keep_nested: bool = opt(False, "factored: every layer's first r factors (switches budgets).")
    seq_len: int | None = opt(None, "Sequence length the budget's FLOPs are counted at "
                                    "(default: the profile's, else 128).")
    force: bool = opt(False, "Replace DEST if it exists and is not empty.")
    push_to_hub: str | None = opt(None, "Also upload DEST to this Hugging Face Hub model repo "
                                        "(user/name; created if missing; needs a token, e.g. "
                                        "from `hf auth login`).")


@dataclass
class FinetuneConfig(DataOptions):
    project: str = project_dir("made by nsn convert")
    steps: int = opt(200, "Optimizer steps.")
    batch_size: int = opt(8, "Rows (LM: blocks) per micro-batch, over all processes together.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    lr: float = opt(1e-4, "Peak learning rate of the model weights (AdamW).")
    scale_lr: float = opt(0.02, "Learning rate of the per-rank log-variances s_k.")
    warmup: float = opt(0.05, "Fraction of --steps warmed up linearly (then cosine to 0.1×).")
    weight_decay: float = opt(0.01, "AdamW weight decay (matrices only).")
    clip: float = opt(1.0, "Clip the gradient norm to this (0: no clipping).")
    dtype: Literal["float32", "bfloat16"] = opt(
        "float32", "Compute dtype: bfloat16 autocasts the forward pass (weights stay float32).")
    seed: int = opt(0, "Seed of the data order, the rank draws, dropout and a new head.")
    ladder: list[float] | str = opt("auto", "FLOPs budgets to train (comma-separated "
                                            "fractions of the dense model at seq_len 128, "
                                            "as nsn profile's --budgets); the largest is "
                                            "trained at every step. auto: from the model's "
                                            "floor through 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, "
                                            "0.7 to 1.")
    ranks_per_step: int = opt(2, "Ladder points trained per step: the top one (and with "
                                 "--sandwich the lowest) plus the rest drawn from the others.")
    sandwich: bool = opt(False, "Train the lowest ladder point at every step too.")
    objective: Literal["uniform", "uncertainty"] = opt(
        "uniform", "How the ranks of a step are combined: uniform (plain average; measured "
                   "best, docs/frontier.md) or uncertainty (the paper's weights exp(-s_k)).")
    distill: bool = opt(True, "Lower ranks also match the top rank's output distribution "
                              "(KL to its detached logits; measured in docs/finetune.md).")
    hidden_distill: float = opt(0.0, "With --distill, also match the top rank's hidden states "
                                     "at every layer, with this weight (docs/frontier.md).")
    calibrate: bool = opt(True, "A project converted without --calib is first re-decomposed "
                                "from its exact full-rank weights by whitened SVD on the "
                                "training data, with the global rank ordering (recorded in "
                                "nsn.json and allocation.json; full rank is unchanged; see "
                                "docs/frontier.md).")
    eval_every: int = opt(50, "Evaluate on the held-out split every N steps (0: only before "
                              "and after training).")
    eval_samples: int = opt(256, "Held-out rows (LM: blocks) used by each evaluation.")
    save_every: int = opt(100, "Checkpoint every N steps (and always at the end).")
    keep_checkpoints: int = opt(2, "Checkpoints kept in DIR/finetune/checkpoints.")
    resume: bool = opt(False, "Continue from the newest complete checkpoint (a fresh start when "
                              "there is none); without it a new run replaces DIR/finetune/.")
    device: str = device_option("train")
    fsdp: bool = opt(False, "Shard weights, gradients and optimizer state over the torchrun "
                            "processes (FSDP2, one unit per transformer block) instead of a "
                            "whole copy on each (DDP): for models whose copy does not fit one "
                            "device. Checkpoints are then written one shard per process and "
                            "resume on any number of processes.")


# ---------------------------------------------------------------- commands with no stage

@dataclass
class InfoConfig:
    project: str = project_dir()


@dataclass
class VerifyConfig:
    project: str = project_dir()


@dataclass
class RunConfig:
    recipe: str = opt(None, "Recipe file (TOML) naming the model, data and stages.")
    project: str | None = opt(None, "Project directory.", unset="runs/<recipe name>",
                              required=False)
    overrides: list[str] = opt([], "Override a recipe value, e.g. --set finetune.steps=200 "
                                   "(repeatable).", flags=("--set",))
    force: bool = opt(False, "Replace PROJECT if it is not an nsn project.")
    junit: str | None = opt(None, "Also write the recipe's expectations as JUnit XML (one "
                                  "testcase each) to this file.", metavar="FILE")
    trust_remote_code: bool = opt(False, "Let the recipe's model run its own code (a recipe "
                                         "or --set alone cannot switch this on).")

@dataclass
class CheckConfig:
    project: str = opt(None, "Project directory (made by nsn run).")
    recipe: str | None = opt(None, "Recipe whose expectations to check (default: the one "
                                   "nsn.json records).", metavar="RECIPE")
    junit: str | None = opt(None, "Also write JUnit XML (one testcase per expectation) to "
                                  "this file.", metavar="FILE")


STAGE_CONFIGS = {"convert": ConvertConfig, "finetune": FinetuneConfig}
STAGE_CONFIGS.update(profile=ProfileConfig, frontier=FrontierConfig, export=ExportConfig)


def help_for(config_cls, name: str) -> str:
    for f in fields(config_cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def default_of(config_cls, name: str):
    for f in fields(config_cls):
        if f.name == name:
            return f.default_factory() if f.default is MISSING else f.default
    raise KeyError(name)


def to_dict(config) -> dict:
    return asdict(config)
