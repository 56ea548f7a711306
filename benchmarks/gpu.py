"""The GPU path in numbers: SVD, bf16 finetune steps (plain vs FSDP) and nested latency.

For each model shape (`--models`, default GPT-2 small and Llama-3.2-1B), on `--device`:

* svd: seconds of the exact SVD of each distinct layer shape (what convert does per
  layer), on the device;
* step: one multi-rank finetune step in bf16 (`Trainer.train_step`: top rank plus one
  ladder rank, AdamW), a whole model on the device (what DDP holds per device) against
  FSDP2 on the same device; step time and peak memory (`torch.cuda.max_memory_allocated`,
  or VmHWM on CPU), and their ratio;
* latency: a forward of batch × seq-len tokens through the nested model at several FLOPs
  budgets against the dense original, timed with CUDA events (wall clock on CPU), as
  paired ratios (see common.py).

Random weights, nested at full rank without SVD (the values do not change the cost).

    python benchmarks/gpu.py --device cuda                  # via benchmarks/gpu.sh
    python benchmarks/gpu.py --device cpu --models llama --layers 2 --quick   # smoke run
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from common import base_parser, build_model, machine_line, print_table, real_config, setup

BUDGETS = (0.25, 0.5, 0.75, 1.0)


def parse_args():
    parser = base_parser(__doc__.split("\n")[0], batch=8)
    parser.add_argument("--models", default="gpt2,llama-1b")
    parser.add_argument("--layers", type=int, default=None, help="cut every model to N blocks")
    parser.add_argument("--steps", type=int, default=3, help="timed finetune steps")
    return parser.parse_args()


class Clock:
    """Seconds of `fn()`: CUDA events on a GPU (no host sync inside), else perf_counter."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as handle:
        return 1024 * next(int(l.split()[1]) for l in handle if l.startswith("VmHWM:"))


def model_for(family: str, layers: int | None):
    """The dense original and a nested copy (random full-rank factors), in float32."""
    from transformers import AutoModelForCausalLM

    from nsn_cli.nested.surgery import build_shells, plan

    if layers:
        config = real_config(family)
        config.num_hidden_layers = config.n_layer = layers
        torch.manual_seed(0)
        dense = AutoModelForCausalLM.from_config(config).eval()
    else:
        dense = build_model(family)
    nested = copy.deepcopy(dense)
    build_shells(nested, plan(nested))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in nested.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return dense, nested


def svd_rows(nested, device: str, clock: Clock) -> list[list[str]]:
    from nsn_cli.nested.decompose import svd_factors
    from nsn_cli.nested.surgery import nested_layers

    shapes = sorted({(m.d_out, m.d_in) for m in nested_layers(nested).values()})
    rows = []
    for d_out, d_in in shapes:
        W = torch.randn(d_out, d_in, device=device)
        svd_factors(W, min(W.shape), "exact")  # warm-up (cuSOLVER handles, workspaces)
        seconds = clock(lambda: svd_factors(W, min(W.shape), "exact"))
        rows.append([f"svd {d_out}x{d_in}", f"{seconds * 1000:.1f}", "ms", ""])
    return rows


def step_rows(nested, args, clock: Clock) -> list[list[str]]:
    from finetune_step import random_blocks, trainer_for

    from nsn_cli.stages.finetune.distributed import setup as dist_setup

    dist = dist_setup(args.device, group=True)  # FSDP needs a (one-process) group
    vocab = nested.get_input_embeddings().num_embeddings
    rows, results = [], {}
    for mode in ("whole", "fsdp"):
        args.fsdp = mode == "fsdp"
        trainer = trainer_for(copy.deepcopy(nested), (0.25, 1.0), 2, args,
                              random_blocks(vocab, args.batch * (args.steps + 1), args.seq_len))
        trainer.train_step(0)  # warm-up: allocator, kernels, AdamW state
        peak_reset(args.device)
        times = [clock(lambda s=s: trainer.train_step(s)) for s in range(1, args.steps + 1)]
        results[mode] = (statistics.median(times), peak_bytes(args.device))
        del trainer
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    dist.close()
    for i, label in ((0, "step (bf16, 2 ranks)"), (1, "step peak memory")):
        whole, fsdp = results["whole"][i], results["fsdp"][i]
        unit, scale = ("ms", 1000) if i == 0 else ("MiB", 2 ** -20)
        rows.append([f"{label}: whole / fsdp", f"{whole * scale:.0f} / {fsdp * scale:.0f}", unit,
                     f"{fsdp / whole:.2f}"])
    return rows


def latency_rows(dense, nested, args, clock: Clock) -> list[list[str]]:
    from nsn_cli.nested.budget import set_budget

    ids = torch.randint(0, dense.get_input_embeddings().num_embeddings,
                        (args.batch, args.seq_len), device=args.device)
    repeats = args.repeats or (3 if args.quick else 10)
    rows = []
    with torch.no_grad(), torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16):
        for budget in BUDGETS:
            set_budget(nested, budget, seq_len=args.seq_len)
            for model in (dense, nested):
                model(input_ids=ids)  # warm-up (and the merged caches at this budget)
            ratios = []
            for _ in range(repeats):
                base = clock(lambda: dense(input_ids=ids))
                ratios.append(clock(lambda: nested(input_ids=ids)) / base)
            rows.append([f"latency nested/dense at budget {budget:g}",
                         f"{statistics.median(ratios):.3f}", "x", f"{min(ratios):.3f}-"
                         f"{max(ratios):.3f}"])
    return rows


def main():
    args = parse_args()
    setup(args)
    clock = Clock(args.device)
    print(machine_line(args.device), flush=True)
    for family in args.models.split(","):
        dense, nested = model_for(family, args.layers)
        rows = svd_rows(nested, args.device, clock)
        nested, dense = nested.to(args.device), dense.to(args.device)
        args.dtype = "bfloat16"
        rows += step_rows(nested, args, clock)
        rows += latency_rows(dense, nested, args, clock)
        print(f"\n{family}: batch {args.batch} x {args.seq_len} tokens")
        print_table(["", "value", "unit", "ratio / spread"], rows)
        del dense, nested
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
