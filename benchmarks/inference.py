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

Two nested copies are timed in the same rounds: `before`, with the inference paths
nsn had before the gauge-aligned form (factored up to the break-even rank, merged
above), and `gauge`, today's default (gauge-aligned, dense near full rank). Each gets
its own table and ideal line (its own rank-1 floor). Also printed: the rank fraction
each path buys at a budget (a square 768 layer, the whole model at --seq-len), and the
memory each holds at budget 0.9 (parameters plus inference caches) against dense.

    python benchmarks/inference.py --threads 1 --clock cpu   # GPT-2 small
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
from nsn_cli.nested.layer import NestedLinear, use_gauge
from nsn_cli.nested.surgery import nested_layers
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
    rank: float | None = None  # mean r / R over the nested layers


def mean_rank(model) -> float:
    layers = nested_layers(model).values()
    return sum(m.rank / m.max_rank for m in layers) / len(layers)


def measure(dense, nested: dict, points, make_fn, seq_len, repeats, device
            ) -> dict[str, list[Row]]:
    """Rows per nested model (name -> model), all timed in the same rounds as dense."""
    dense_run = make_fn(dense)
    rows = {name: [] for name in nested}
    for point in points:
        runs = {"dense": dense_run}
        for name, model in nested.items():
            refused = apply_point(model, point)
            if refused is not None:
                print(f"  {name} {point}: BudgetError: {refused}", flush=True)
                rows[name].append(Row(point))
            else:
                runs[name] = make_fn(model)
        times = interleaved(runs, repeats, device=device)
        secs, ratios = seconds(times), paired_ratios(times, "dense")
        for name in runs.keys() - {"dense"}:
            model = nested[name]
            rows[name].append(Row(point, flops_fraction(model, seq_len=seq_len), ratios[name],
                                  secs[name].min / secs["dense"].min, secs[name],
                                  secs["dense"], mean_rank(model)))
        print(f"  measured {point}: " + ", ".join(
            f"{n} {rows[n][-1].ratio.median:.3f}" for n in nested if rows[n][-1].ratio), flush=True)
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
            body.append([label, "below floor", "", "", "", "", "", "", ""])
            continue
        line, ratio = ideal(row.fraction), row.ratio
        body.append([label, f"{row.fraction:.3f}", f"{row.rank:.3f}", f"{line:.3f}",
                     f"{ratio.median:.3f}",
                     f"{ratio.min:.3f}-{ratio.max:.3f}", f"{ratio.median - line:+.3f}",
                     f"{row.best:.3f}", f"{row.nested.median * 1e3:.{digits}f} / "
                                        f"{row.dense.median * 1e3:.{digits}f}"])
    print(f"\n{title}")
    print_table(["budget", "FLOPs", "rank", "ideal", "ratio", "min-max", "vs ideal", "best/best",
                 "ms nested / dense"], body)


# ---------------------------------------------------------------- main

def points_for(args):
    if args.budgets:
        budgets = tuple(float(b) for b in args.budgets.split(","))
    else:
        budgets = QUICK_BUDGETS if args.quick else BUDGETS
    return (FLOOR, *budgets)


BUYS = (0.5, 0.75, 0.9)


def buys(models: dict, seq_len: int) -> None:
    """The rank fraction a budget buys, per path: one square 768 layer, the whole model."""
    body = []
    for budget in BUYS:
        cells = [f"{budget:g}"]
        for name, model in models.items():
            square = NestedLinear(768, 768, 768)
            for factor in (square.A, square.B):  # real values: pivots need them
                torch.nn.init.normal_(factor, generator=torch.Generator().manual_seed(0))
            square.gauge_aligned = name == "gauge"
            dense = square.flops_per_token(768)
            cells.append(f"{max(r for r in range(1, 769) if square.flops_per_token(r) <= budget * dense) / 768:.3f}")
        for name, model in models.items():
            set_budget(model, budget, seq_len=seq_len)
            cells.append(f"{mean_rank(model):.3f}")
        body.append(cells)
    names = list(models)
    print(f"\nrank fraction bought (uniform ranks; whole model at seq_len {seq_len})")
    print_table(["budget", *(f"square 768, {n}" for n in names),
                 *(f"model, {n}" for n in names)], body)


def cache_bytes(model) -> tuple[int, int]:
    """(bytes of every inference cache the nested layers hold, bytes of one dense copy
    of each layer that holds one)."""
    held = dense_sized = 0
    for m in nested_layers(model).values():
        caches = [c for c in (m._merged, m._columns) if c is not None]
        size = sum(c.numel() * c.element_size() for c in caches)
        if m._pair is not None:
            size += m._pair.numel() * m._pair.k.element_size()
        held += size
        dense_sized += m.d_in * m.d_out * m.A.element_size() if size else 0
    return held, dense_sized


def memory(dense, models: dict, ids) -> None:
    """Bytes held after a forward at budget 0.9: parameters (the factors and the rest)
    plus caches, against dense, against "factors + one dense copy of each layer that
    runs dense", and whether each layer's cache is at most one dense copy of it."""
    base = sum(p.numel() * p.element_size() for p in dense.parameters())
    body = []
    for name, model in models.items():
        set_budget(model, 0.9)
        prefill_fn(model, ids)()
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        caches, dense_sized = cache_bytes(model)
        strict = params + sum(m.d_in * m.d_out * m.A.element_size()
                              for m in nested_layers(model).values() if m.uses_dense())
        held = params + caches
        body.append([name, f"{held / 1e6:.0f}", f"{held / base:.3f}", f"{params / 1e6:.0f}",
                     f"{caches / 1e6:.0f}", f"{strict / 1e6:.0f}",
                     "yes" if held <= strict else "no",
                     "yes" if caches <= dense_sized else "no"])
    print(f"\nmemory held at budget 0.9 (dense model: {base / 1e6:.0f} MB)")
    print_table(["path", "MB", "/ dense", "params MB", "caches MB",
                 "factors + dense copies of dense layers", "within", "cache <= 1 dense copy/layer"],
                body)


def run_family(family, args):
    device = args.device
    repeats = args.repeats or (2 if args.quick else 3)
    dense = build_model(family).to(device)
    nested = copy.deepcopy(dense)
    start = time.perf_counter()
    convert_model(nested, nest_head=args.nest_head and is_decoder(family))
    print(f"\n== {family}: {sum(p.numel() for p in dense.parameters()) / 1e6:.0f}M parameters, "
          f"converted in {time.perf_counter() - start:.1f} s", flush=True)
    before = copy.deepcopy(nested)
    use_gauge(before, False)
    nested = {"before": before, "gauge": nested}
    buys(nested, args.seq_len)
    points = points_for(args)
    gen = torch.Generator().manual_seed(0)
    vocab = dense.config.vocab_size
    if not args.skip_prefill:
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(device)
        memory(dense, nested, ids)
        rows = measure(dense, nested, points, lambda m: prefill_fn(m, ids), args.seq_len,
                       repeats, device)
        for name, path_rows in rows.items():
            report(f"{family} prefill, batch {args.batch} x {args.seq_len}, {name} "
                   f"(latency ratio nested / dense)", path_rows, digits=0)
    if is_decoder(family) and not args.skip_decode:
        steps = 8 if args.quick else args.new_tokens
        prompt = torch.randint(0, vocab, (1, args.prompt), generator=gen).to(device)
        tokens = torch.randint(0, vocab, (steps,), generator=gen).to(device)
        context = args.prompt + steps // 2
        rows = measure(dense, nested, points, lambda m: decode_fn(m, prompt, tokens, device),
                       context, repeats, device)
        for name, path_rows in rows.items():
            report(f"{family} decode with KV cache, batch 1, prompt {args.prompt}, {steps} "
                   f"steps, {name} (per-token latency ratio; FLOPs at context {context})",
                   path_rows, digits=1)


def main():
    args = parse_args()
    setup(args)
    print(machine_line(args.device))
    families = FAMILIES if args.model == "all" else [f.strip() for f in args.model.split(",")]
    for family in families:
        run_family(family, args)


if __name__ == "__main__":
    main()
