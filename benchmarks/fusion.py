"""Would fusing the q/k/v projections (one product for all three) make nsn faster?

q, k and v read the same input, so they could run as one matrix product on weights
stacked row-wise: one merged matrix on the dense path, one stacked A on the factored
path (x·[A_q; A_k; A_v]ᵀ, then each B on its slice). This script measures that against
the three separate products nsn runs today, on the first attention block of a converted
model (random weights, real shape), at full rank (dense path) and at a quarter of it
(factored path), for a prefill batch (8 × 128 rows) and one decoding row. Beside each
saving it puts what the saving over every layer comes to as a share of one whole
forward (prefill) or one cached decoding step, timed in the same rounds.

GPT-2 already stores q/k/v as one fused matrix (c_attn), so the shapes here are
BERT-base (3 × 768 → 768) and the Llama shape (768 → 768, 256, 256 with grouped KV).

    python benchmarks/fusion.py --threads 1 --clock cpu
    python benchmarks/fusion.py --quick
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import (base_parser, build_model, interleaved, is_decoder, machine_line,
                    paired_ratios, print_table, seconds, setup)
from nsn_cli.nested.budget import set_rank
from nsn_cli.stages.convert import convert_model
from nsn_cli.nested.layer import NestedLinear, use_gauge
from switch import decoder_step, prefill

RANK_FRACTIONS = (1.0, 0.25)  # dense path, factored path


def parse_args():
    parser = base_parser(__doc__.split("\n")[0], batch=8)
    parser.add_argument("--model", default="bert,llama", help="bert, llama or both (default)")
    return parser.parse_args()


def qkv_layers(model) -> list[NestedLinear]:
    """The first block's query, key and value projections (in that order)."""
    found = {}
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if isinstance(module, NestedLinear) and short in {"q_proj", "k_proj", "v_proj",
                                                          "query", "key", "value"}:
            found.setdefault(short[0], module)  # q, k, v; the first block comes first
    return [found[k] for k in "qkv"]


def separate(layers, x):
    return lambda: [layer(x) for layer in layers]


def fused(layers, x):
    """The same three outputs from one product on weights stacked once, ahead of time."""
    sizes = [layer.d_out for layer in layers]
    bias = torch.cat([torch.zeros(layer.d_out) if layer.bias is None else layer.bias.detach()
                      for layer in layers])
    if all(layer.uses_dense() for layer in layers):
        stacked = torch.cat([layer.merged_weight() for layer in layers])
        return lambda: F.linear(x, stacked, bias).split(sizes, -1)
    ranks = [layer.rank for layer in layers]
    stacked_a = torch.cat([layer.A[:layer.rank].detach() for layer in layers])
    columns = [layer.b_transposed()[:layer.rank] for layer in layers]

    def run():
        hidden = F.linear(x, stacked_a).split(ranks, -1)
        return [F.linear(h, c.t(), b) for h, c, b in zip(hidden, columns, bias.split(sizes))]
    return run


def measure(family, nested, rows, fraction, args):
    layers = qkv_layers(nested)
    blocks = nested.config.num_hidden_layers
    with torch.inference_mode():
        x = torch.randn(rows, layers[0].d_in)
        ids = torch.randint(0, nested.config.vocab_size, (args.batch, args.seq_len))
        if rows == 1:
            if not is_decoder(family):
                return None
            forward = decoder_step(nested, ids[:1], ids[:1, :1])
        else:
            forward = prefill(nested, ids)
        candidates = {"separate": separate(layers, x), "fused": fused(layers, x),
                      "forward": forward}
        times = interleaved(candidates, args.repeats, warmup=2, device=args.device)
    ratio = paired_ratios(times, "separate")["fused"]
    spent = seconds(times)
    saved = spent["separate"].median - spent["fused"].median
    kind = "decode, 1 row" if rows == 1 else f"prefill, {rows} rows"
    path = "dense" if layers[0].uses_dense() else "factored"
    return [family, kind, f"{fraction:g} ({path})", f"{spent['separate'].median * 1e6:.0f}",
            f"{spent['fused'].median * 1e6:.0f}",
            f"{ratio.median:.3f} ({ratio.min:.2f}-{ratio.max:.2f})",
            f"{100 * blocks * saved / spent['forward'].median:+.1f}%"]


def main():
    args = parse_args()
    setup(args)
    args.repeats = args.repeats or (5 if args.quick else 15)
    print(machine_line(args.device))
    table = []
    for family in args.model.split(","):
        nested = build_model(family).to(args.device)
        convert_model(nested)
        use_gauge(nested, False)  # this script studies the factored path (written before the gauge form)
        for fraction in RANK_FRACTIONS:
            set_rank(nested, fraction=fraction)
            for rows in (args.batch * args.seq_len, 1):
                row = measure(family, nested, rows, fraction, args)
                if row:
                    table.append(row)
                    print(" | ".join(row), flush=True)
    print()
    print_table(["model", "input", "rank", "separate µs", "fused µs", "fused / separate",
                 "saved per forward"], table)
    print("\nsaved per forward: (separate − fused) × blocks ÷ one whole forward (prefill) "
          "or one cached decoding step, medians from the same rounds; negative = fusion "
          "is slower.")


if __name__ == "__main__":
    main()
