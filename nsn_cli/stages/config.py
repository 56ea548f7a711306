"""One dataclass per stage. Field docs are the single source of help text.

The CLI builds its options from these fields (see `help_for`), recipes validate their
keys against them, and each stage records its resolved config in `nsn.json`.
Only the standard library is imported here, so `nsn --help` stays instant.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields


def opt(default, help: str, **extra):
    """A config field with its help text attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ConvertConfig:
    model: str = opt(None, "Hub id (e.g. gpt2) or local directory of the pretrained model.")
    out_dir: str = opt(None, "Project directory to create.")
    task: str | None = opt(None, "causal-lm or seq-cls; guessed from the model when omitted.")
    targets: str = opt("all", "Layers to nest: all (every linear in the blocks), attn, mlp, "
                              "or a regex on module names.")
    nest_head: bool = opt(False, "Nest the LM head too; a head tied to the input embedding "
                                 "gets its own copy (vocab × hidden more parameters). Lowers "
                                 "the budget floor of models whose head is a large share "
                                 "of FLOPs, such as GPT-2.")
    max_rank: int | None = opt(None, "Cap on R, the largest rank kept per layer.")
    max_rank_fraction: float | None = opt(None, "Cap on R as a fraction of min(d_in, d_out).")
    svd: str = opt("auto", "SVD method: auto, exact or randomized.")
    calib: str | None = opt(None, "Calibration data (anything --data takes): factor each layer "
                                  "by activation-aware SVD on its real inputs.")
    calib_samples: int = opt(128, "Rows (or LM blocks) of the calibration data to use.")
    calib_seq_len: int = opt(128, "Tokens per calibration row or LM block.")
    allocation: str = opt("auto", "Rank allocation across layers: uniform (the same fraction "
                                  "of R everywhere), global (one nested ordering of all "
                                  "components by output energy per FLOP, weighted by measured "
                                  "layer sensitivity), or auto: global with --calib, else "
                                  "uniform.")
    num_labels: int | None = opt(None, "Classes of a new classification head (seq-cls).")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = opt(False, "Allow the model repository to run its own code.")
    force: bool = opt(False, "Replace OUT_DIR if it exists and is not empty.")
    dry_run: bool = opt(False, "List the layers that would be nested; write nothing.")


@dataclass
class ProfileConfig:
    project: str = opt(None, "Project directory.")
    data: str | None = opt(None, "Evaluation data (anything finetune's --data takes); default: "
                                 "the data the project was finetuned on.")
    text_column: str | None = opt(None, "Text column (default: finetune's, else 'text').")
    label_column: str | None = opt(None, "Label column for seq-cls (default: finetune's, "
                                         "else 'label').")
    split: str | None = opt(None, "Split the held-out part is carved from when the data has "
                                  "no evaluation split (default: finetune's, else 'train').")
    eval_split: str | None = opt(None, "Held-out split to measure on (default: finetune's, "
                                       "else validation/valid/test if present).")
    eval_fraction: float | None = opt(None, "Fraction held out when there is no evaluation "
                                            "split (default: finetune's, else 0.1).")
    max_samples: int | None = opt(None, "Use at most this many held-out rows (LM: blocks).")
    seq_len: int | None = opt(None, "Tokens per LM block / max tokens per row; FLOPs are per "
                                    "token at this length (default: finetune's, else 128).")
    batch_size: int = opt(8, "Rows (LM: blocks) per batch, for the metric and the latency.")
    budgets: list[float] | None = opt(None, "FLOPs budgets to measure, as fractions of the "
                                            "dense model (default: 12 points from 0.05 to 1).")
    rank_fractions: list[float] | None = opt(None, "Measure these fractions of R in every "
                                                   "layer instead of --budgets.")
    baseline: bool = opt(False, "Also measure untrained truncated SVD at the same settings "
                                "(re-converts the source model, which must be reachable).")
    repeats: int = opt(5, "Timed forward passes per point (the median is reported).")
    warmup: int = opt(2, "Untimed forward passes before timing each point.")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (cuda when available).")
    dtype: str = opt("float32", "float32, bfloat16 or float16.")
    threads: int | None = opt(None, "CPU threads to measure with (default: torch's choice); "
                                    "latency ratios depend on it, so use what you deploy with.")


@dataclass
class FrontierConfig:
    project: str = opt(None, "Project directory (profiled with nsn profile).")
    budget: float | None = opt(None, "Print the best measured setting whose FLOPs fraction is "
                                     "at most this.")
    plot: bool = opt(False, "Write frontier/frontier.png and .svg.")
    metric: str | None = opt(None, "Metric to optimise: perplexity or nll (causal-lm), accuracy "
                                   "or macro_f1 (seq-cls); default: perplexity / accuracy.")


@dataclass
class ExportConfig:
    project: str = opt(None, "Project directory.")
    dest: str = opt(None, "Directory to write the exported model to.")
    budget: float | None = opt(None, "FLOPs budget as a fraction of the dense model.")
    rank_fraction: float | None = opt(None, "Fraction of R in every layer (instead of --budget).")
    format: str = opt("factored", "factored (nsn project holding only the first r components; "
                                  "load with nsn_cli.load) or merged (plain HF model, dense "
                                  "B_r A_r; loads with from_pretrained).")
    seq_len: int | None = opt(None, "Sequence length the budget's FLOPs are counted at "
                                    "(default: the profile's, else 128).")
    force: bool = opt(False, "Replace DEST if it exists and is not empty.")


@dataclass
class FinetuneConfig:
    project: str = opt(None, "Project directory (made by nsn convert).")
    data: str = opt(None, "Training data: a hub dataset name (aliases: wikitext, sst2, imdb, "
                          "ag_news, tinystories), a local .txt/.jsonl/.json/.csv/.parquet file, "
                          "or a directory of such files.")
    text_column: str = opt("text", "Column holding the text.")
    label_column: str = opt("label", "Column holding the class (seq-cls); '' ignores a label "
                                     "column in causal-LM data.")
    split: str = opt("train", "Split to train on.")
    eval_split: str | None = opt(None, "Held-out split (default: validation/valid/test if the "
                                       "data has one, else --eval-fraction carved from --split).")
    eval_fraction: float = opt(0.1, "Fraction held out (with --seed) when there is no "
                                    "evaluation split.")
    max_samples: int | None = opt(None, "Use at most this many rows of each split.")
    seq_len: int | None = opt(None, "Tokens per LM block / max tokens per row (default: the "
                                    "model's context, at most 256).")
    steps: int = opt(200, "Optimizer steps.")
    batch_size: int = opt(8, "Rows (LM: blocks) per micro-batch, over all processes together.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    lr: float = opt(1e-4, "Peak learning rate of the model weights (AdamW).")
    scale_lr: float = opt(0.02, "Learning rate of the per-rank log-variances s_k.")
    warmup: float = opt(0.05, "Fraction of --steps with a linear learning-rate warmup (then "
                              "cosine decay to a tenth).")
    weight_decay: float = opt(0.01, "AdamW weight decay (matrices only).")
    clip: float = opt(1.0, "Clip the gradient norm to this (0: no clipping).")
    precision: str = opt("fp32", "fp32, or bf16 (autocast; weights stay fp32).")
    seed: int = opt(0, "Seed of the data order, the rank draws, dropout and a new head.")
    ladder: list[float] | str = opt([0.0625, 0.125, 0.25, 0.5, 1.0],
                                    "Trainable rank fractions (comma-separated); the largest is "
                                    "trained at every step.")
    ranks_per_step: int = opt(2, "Ranks trained per step: the top one plus this minus one "
                                 "drawn from the rest of the ladder.")
    objective: str = opt("uncertainty", "uncertainty (learned weights exp(-s_k)) or uniform "
                                        "(plain average over the ranks of a step).")
    distill: bool = opt(True, "Lower ranks also match the top rank's output distribution "
                              "(KL to its detached logits); on by default, as measured in "
                              "benchmarks/finetune_objectives.py (see the README).")
    eval_every: int = opt(50, "Evaluate on the held-out split every N steps (0: only before "
                              "and after training).")
    eval_samples: int = opt(256, "Held-out rows (LM: blocks) used by each evaluation.")
    save_every: int = opt(100, "Checkpoint every N steps (and always at the end).")
    keep_checkpoints: int = opt(2, "Checkpoints kept in DIR/finetune/checkpoints.")
    resume: bool = opt(False, "Continue from the newest complete checkpoint (a fresh start when "
                              "there is none); without it a new run replaces DIR/finetune/.")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (cuda when available).")


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
