"""Where should a nested layer stop running gauge-aligned and run its merged dense matrix?

For each layer shape of GPT-2 small (and any `--shapes`), one NestedLinear with real
SVD factors is timed on `--rows` input rows at ranks across its range, forced onto
the gauge-aligned path, next to the dense `nn.Linear` of the same shape, interleaved
round by round. Printed per rank: the FLOPs ratio of the gauge form to dense, the
measured time ratio, their quotient (the gauge form's cost per FLOP relative to the
dense product's: above 1 means its thinner, ragged matmuls and its gather run slower
per FLOP), and the time ratio nsn's cost model predicts (nested/gauge.py:
`gauge_time_ratio`). The last columns say from which rank the measured gauge form was
no faster than dense and where `dense_from` puts the switch.

    python benchmarks/gauge_cost.py --threads 1 --clock cpu
    python benchmarks/gauge_cost.py --shapes 2048x2048,2048x8192 --rows 512
"""

from __future__ import annotations

import torch

from common import base_parser, interleaved, machine_line, paired_ratios, print_table, setup
from nsn_cli.nested.decompose import svd_factors
from nsn_cli.nested.gauge import dense_from, gauge_time_ratio
from nsn_cli.nested.layer import NestedLinear

GPT2_SHAPES = "768x2304,768x768,768x3072,3072x768"
FRACTIONS = (0.2, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def layer_pair(d_in: int, d_out: int, seed: int = 0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(d_in, d_out).eval()
    A, B = svd_factors(dense.weight.detach(), min(d_in, d_out))
    nested = NestedLinear.from_factors(A, B, dense.bias.detach()).eval()
    nested.dense_from = min(d_in, d_out) + 1  # gauge-aligned at every rank, for timing
    return dense, nested


def shape_rows(d_in: int, d_out: int, rows: int, repeats: int) -> list[list[str]]:
    dense, nested = layer_pair(d_in, d_out)
    n = min(d_in, d_out)
    x = torch.randn(rows, d_in, generator=torch.Generator().manual_seed(1))
    body, slower_from = [], None
    for fraction in FRACTIONS:
        r = max(1, round(fraction * n))
        nested.set_rank(r)
        with torch.no_grad():
            times = interleaved({"dense": lambda: dense(x), "gauge": lambda: nested(x)},
                                repeats, warmup=2)
        ratio = paired_ratios(times, "dense")["gauge"].median
        flops = r * (d_in + d_out - r) / (d_in * d_out)
        if ratio >= 1 and slower_from is None:
            slower_from = r
        body.append([f"{d_in}x{d_out}", f"{r}", f"{flops:.3f}", f"{ratio:.3f}",
                     f"{ratio / flops:.2f}", f"{gauge_time_ratio(d_in, d_out, r):.3f}"])
    for row in body:
        row += [str(slower_from or "-"), str(dense_from(d_in, d_out))]
    return body


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=GPT2_SHAPES, help="d_inxd_out, comma-separated")
    parser.add_argument("--rows", type=int, default=1024, help="input rows (prefill 8x128)")
    args = parser.parse_args()
    setup(args)
    repeats = args.repeats or (3 if args.quick else 9)
    print(machine_line(args.device))
    body = []
    for shape in args.shapes.split(","):
        d_in, d_out = (int(v) for v in shape.split("x"))
        body += shape_rows(d_in, d_out, args.rows, repeats)
    print(f"\ngauge-aligned layer against dense, {args.rows} rows (time ratio: median of "
          f"{repeats} paired rounds)")
    print_table(["shape", "rank", "FLOPs", "time", "time/FLOPs", "model",
                 "measured >= dense from", "dense_from"], body)


if __name__ == "__main__":
    main()
