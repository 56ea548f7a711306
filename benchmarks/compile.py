"""Does torch.compile make the dense original or the nested model faster?

Times a prefill batch (8 × 128) of four models side by side, interleaved: the dense
original and the nested model at one budget, each eager and under `torch.compile`
(default mode, compiled and warmed before timing). Ratios are to the eager dense model
in the same round. Compile times are printed too; they are paid once per process, and
again by the nested model after a budget change (its ranks are Python state, so dynamo
guards on them).

    python benchmarks/compile.py --threads 1 --clock cpu
    python benchmarks/compile.py --model gpt2 --budget 0.75 --quick
"""

from __future__ import annotations

import logging
import time

import torch

from common import (base_parser, build_model, interleaved, machine_line, paired_ratios,
                    print_table, setup)
from nsn_cli.nested.budget import set_budget
from nsn_cli.stages.convert import convert_model
from switch import prefill


def parse_args():
    parser = base_parser(__doc__.split("\n")[0], batch=8)
    parser.add_argument("--model", default="bert", help="bert (default), gpt2 or llama shape")
    parser.add_argument("--budget", type=float, default=0.5)
    return parser.parse_args()


def compiled(model, ids, device):
    """torch.compile(model), compiled and warmed on `ids`; (module, seconds it took)."""
    start = time.perf_counter()
    module = torch.compile(model)
    prefill(module, ids)()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return module, time.perf_counter() - start


def main():
    args = parse_args()
    setup(args)
    args.repeats = args.repeats or (3 if args.quick else 9)
    # Dynamo warns when a function exceeds its recompile limit and falls back to eager:
    # that fallback is part of what is measured here, not something to print 50 times.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    print(machine_line(args.device))
    dense = build_model(args.model).to(args.device)
    nested = build_model(args.model).to(args.device)
    convert_model(nested)
    set_budget(nested, args.budget)
    ids = torch.randint(0, dense.config.vocab_size, (args.batch, args.seq_len),
                        device=args.device)
    dense_c, dense_s = compiled(dense, ids, args.device)
    nested_c, nested_s = compiled(nested, ids, args.device)
    candidates = {"dense, eager": prefill(dense, ids), "dense, compiled": prefill(dense_c, ids),
                  f"nested {args.budget:g}, eager": prefill(nested, ids),
                  f"nested {args.budget:g}, compiled": prefill(nested_c, ids)}
    times = interleaved(candidates, args.repeats, warmup=1, device=args.device)
    ratios = paired_ratios(times, "dense, eager")
    compile_s = {"dense, compiled": dense_s, f"nested {args.budget:g}, compiled": nested_s}
    rows = [[name, f"{r.median:.3f}", f"{r.min:.3f}-{r.max:.3f}",
             f"{compile_s[name]:.1f}" if name in compile_s else ""]
            for name, r in ratios.items()]
    print(f"\n{args.model} prefill, batch {args.batch} x {args.seq_len} "
          f"(latency ratio to the eager dense model)")
    print_table(["model", "ratio", "min-max", "compile s"], rows)


if __name__ == "__main__":
    main()
