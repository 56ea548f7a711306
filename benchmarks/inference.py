"""Does latency follow FLOPs? Nested model at budgets 0.1 … 1.0 against the dense original.

For each model shape (random weights, built from its config) the script converts a copy
in memory with `nsn_cli.convert.convert_model`, then for every budget times the nested
model and the ORIGINAL dense model side by side (interleaved rounds, paired ratios):

* prefill: one forward over a batch of 8 × 128 tokens;
* decode: single-token steps with a KV cache (decoders only), batch 1.

Columns: the FLOPs fraction the budget chose; the *ideal line*, the straight line from
(f0, t0), the FLOPs fraction and latency ratio at rank 1 everywhere, to (1, 1) (part of
every forward does not shrink with rank: embeddings, norms, softmax, a dense LM head,
so this line is the best any nested model can do); the latency ratio nested / dense,
median over rounds of the ratio within each round, with its min and max; its distance
to the ideal line; the ratio of the two fastest runs (best/best), which a busy machine
disturbs least; and the median milliseconds of each model.

    python benchmarks/inference.py                 # GPT-2 small, a few minutes
    python benchmarks/inference.py --model all     # + BERT-base and a ~100M Llama
    python benchmarks/inference.py --quick --model bert
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from common import (FAMILIES, Spread, base_parser, build_model, interleaved, is_decoder,
                    machine_line, now, paired_ratios, print_table, seconds, setup, synchronize)
from nsn_cli.nested.budget import apply_ranks, flops_fraction, set_budget, settings_for
from nsn_cli.stages.convert import convert_model
from nsn_cli.errors import BudgetError

BUDGETS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)
QUICK_BUDGETS = (0.25, 0.5, 0.75, 1.0)
FLOOR = "rank 1"


def parse_args():
    parser = base_parser(__doc__.split("\n")[0], batch=8)
    parser.add_argument("--model", default="gpt2",
                        help=f"comma-separated shapes from {', '.join(FAMILIES)}, or all")
    parser.add_argument("--prompt", type=int, default=32, help="decode: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode: steps timed")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--nest-head", action="store_true",
                        help="nest the LM head too (a copy when tied), as convert --nest-head")
    parser.add_argument("--budgets", default=None,
                        help="comma-separated budgets (default 0.1 … 1.0)")
    return parser.parse_args()


# ---------------------------------------------------------------- workloads

def prefill_fn(model, ids):
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
    return run


def decode_fn(model, prompt, steps, device):
    """Prefill the prompt (untimed), then time `len(steps)` single-token cached steps."""
    def run() -> float:
        with torch.inference_mode():
            out = model(input_ids=prompt, use_cache=True)
            cache = out.past_key_values
            synchronize(device)
            start = now()
            for token in steps:
                out = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
            synchronize(device)
            return (now() - start) / len(steps)
    return run


# ---------------------------------------------------------------- one table

def apply_point(model, point) -> str | None:
    """Set the ranks for a point; a budget below the floor is reported, not raised."""
    if point == FLOOR:
        apply_ranks(model, settings_for(model).ranks(0))
        return None
    try:
        set_budget(model, point)
    except BudgetError as exc:
        return str(exc)
    return None


@dataclass
class Row:
    point: object  # a budget, or FLOOR
    fraction: float | None = None  # None: below the floor
    ratio: Spread | None = None  # paired per-round ratios nested / dense
    best: float | None = None  # fastest nested run / fastest dense run
    nested: Spread | None = None  # seconds
    dense: Spread | None = None


def measure(dense, nested, points, make_fn, seq_len, repeats, device) -> list[Row]:
    dense_run = make_fn(dense)
    rows = []
    for point in points:
        refused = apply_point(nested, point)
        if refused is not None:
            print(f"  {point}: BudgetError: {refused}", flush=True)
            rows.append(Row(point))
            continue
        fraction = flops_fraction(nested, seq_len=seq_len)
        times = interleaved({"dense": dense_run, "nested": make_fn(nested)}, repeats,
                            device=device)
        secs = seconds(times)
        rows.append(Row(point, fraction, paired_ratios(times, "dense")["nested"],
                        secs["nested"].min / secs["dense"].min, secs["nested"], secs["dense"]))
        print(f"  measured {point}: ratio {rows[-1].ratio.median:.3f}", flush=True)
    return rows


def ideal_line(rows: list[Row]):
    """Latency ratio on the straight line from (f0, t0), rank 1 everywhere, to (1, 1)."""
    floor = next(r for r in rows if r.point == FLOOR)
    f0, t0 = floor.fraction, floor.ratio.median
    return lambda f: t0 + (f - f0) * (1 - t0) / (1 - f0)


def report(title: str, rows: list[Row], digits: int) -> None:
    ideal = ideal_line(rows)
    body = []
    for row in rows:
        label = row.point if isinstance(row.point, str) else f"{row.point:.2f}"
        if row.fraction is None:
            body.append([label, "below floor", "", "", "", "", "", ""])
            continue
        line, ratio = ideal(row.fraction), row.ratio
        body.append([label, f"{row.fraction:.3f}", f"{line:.3f}", f"{ratio.median:.3f}",
                     f"{ratio.min:.3f}-{ratio.max:.3f}", f"{ratio.median - line:+.3f}",
                     f"{row.best:.3f}", f"{row.nested.median * 1e3:.{digits}f} / "
                                        f"{row.dense.median * 1e3:.{digits}f}"])
    print(f"\n{title}")
    print_table(["budget", "FLOPs", "ideal", "ratio", "min-max", "vs ideal", "best/best",
                 "ms nested / dense"], body)


# ---------------------------------------------------------------- main

def points_for(args):
    if args.budgets:
        budgets = tuple(float(b) for b in args.budgets.split(","))
    else:
        budgets = QUICK_BUDGETS if args.quick else BUDGETS
    return (FLOOR, *budgets)


def run_family(family, args):
    device = args.device
    repeats = args.repeats or (2 if args.quick else 3)
    dense = build_model(family).to(device)
    nested = copy.deepcopy(dense)
    start = time.perf_counter()
    convert_model(nested, nest_head=args.nest_head and is_decoder(family))
    print(f"\n== {family}: {sum(p.numel() for p in dense.parameters()) / 1e6:.0f}M parameters, "
          f"converted in {time.perf_counter() - start:.1f} s", flush=True)
    points = points_for(args)
    gen = torch.Generator().manual_seed(0)
    vocab = dense.config.vocab_size
    if not args.skip_prefill:
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(device)
        rows = measure(dense, nested, points, lambda m: prefill_fn(m, ids), args.seq_len,
                       repeats, device)
        report(f"{family} prefill, batch {args.batch} x {args.seq_len} "
               f"(latency ratio nested / dense)", rows, digits=0)
    if is_decoder(family) and not args.skip_decode:
        steps = 8 if args.quick else args.new_tokens
        prompt = torch.randint(0, vocab, (1, args.prompt), generator=gen).to(device)
        tokens = torch.randint(0, vocab, (steps,), generator=gen).to(device)
        context = args.prompt + steps // 2
        rows = measure(dense, nested, points, lambda m: decode_fn(m, prompt, tokens, device),
                       context, repeats, device)
        report(f"{family} decode with KV cache, batch 1, prompt {args.prompt}, {steps} steps "
               f"(per-token latency ratio; FLOPs at context {context})", rows, digits=1)


def main():
    args = parse_args()
    setup(args)
    print(machine_line(args.device))
    families = FAMILIES if args.model == "all" else [f.strip() for f in args.model.split(",")]
    for family in families:
        run_family(family, args)


if __name__ == "__main__":
    main()
