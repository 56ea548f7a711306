"""Per-process memory of a finetune step: FSDP2 (`--fsdp`) against DDP, 2 processes.

A nested GPT-2-small-shaped model (or `--model`), every layer at full rank with random
factors (memory does not depend on their values), trains a few steps under
`torchrun --nproc-per-node 2` exactly as `nsn finetune` sets it up: `distributed.shard`
(FSDP2, one unit per block) or `distributed.wrap` (DDP), AdamW from `build_optimizer`,
each step at the top rank and one lower ladder rank. Each process reports

* parameter, gradient and AdamW-moment bytes it holds (its shards under FSDP),
* its resident memory (RSS) once the model is set up, and the peak RSS of the steps
  (VmHWM, reset after setup through /proc/self/clear_refs), Linux only.

The ratio FSDP / DDP of the peak, side by side in one run, is the saving.

    python benchmarks/fsdp_memory.py [--model gpt2] [--steps 3] [--procs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2", help="gpt2 (default), bert, llama shape")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="rows per process")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def held_bytes(model, optimizer) -> dict:
    """Bytes of this process's own parameter, gradient and optimizer-state storage."""
    from nsn_cli.project.shards import local_rows

    def size(t):
        t = local_rows(t.detach())[0]
        return t.numel() * t.element_size()

    params = list(model.parameters())
    moments = [v for s in optimizer.state.values() for v in s.values() if v.dim()]
    return {"params": sum(size(p) for p in params),
            "grads": sum(size(p.grad) for p in params if p.grad is not None),
            "moments": sum(size(m) for m in moments)}


def worker(args) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from common import build_model

    from nsn_cli.nested.budget import apply_ranks
    from nsn_cli.nested.surgery import build_shells, plan
    from nsn_cli.stages.config import FinetuneConfig
    from nsn_cli.stages.finetune.distributed import setup, shard, wrap
    from nsn_cli.stages.finetune.objective import RankWeights, ladder_settings
    from nsn_cli.stages.finetune.trainer import build_optimizer

    dist = setup(args.device)
    model = build_model(args.model)
    build_shells(model, plan(model))
    torch.manual_seed(0)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    model.to(dist.device).train()
    settings = ladder_settings(model, [0.25, 1.0])
    net = shard(model, dist, args.dtype) if args.worker == "fsdp" else wrap(model, dist)
    cfg = FinetuneConfig(dtype=args.dtype)
    weights = RankWeights(2, cfg.objective).to(dist.device)
    optimizer = build_optimizer(model, weights, cfg)
    vocab = model.get_input_embeddings().num_embeddings
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := current RSS: the peak of the steps alone
    gen = torch.Generator().manual_seed(dist.rank)
    for _ in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(dist.device)
        for index in (1, 0):
            apply_ranks(model, settings[index])
            with torch.autocast(dist.device.type, dtype=torch.bfloat16,
                                enabled=args.dtype == "bfloat16"):
                loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        held = held_bytes(model, optimizer)  # before zero_grad drops the gradients
        optimizer.zero_grad(set_to_none=True)
    peak = status_kib("VmHWM")
    print("NSN-RESULT " + json.dumps({"rank": dist.rank, "rss_setup": before * 1024,
                                      "peak_steps": peak * 1024, **held}), flush=True)
    dist.close()


def launch(args, mode: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(args.procs), __file__, "--worker", mode, "--model", args.model,
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq-len",
           str(args.seq_len), "--device", args.device, "--dtype", args.dtype]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
            if line.startswith("NSN-RESULT ")]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import print_table

    results = {mode: launch(args, mode) for mode in ("ddp", "fsdp")}
    mib = 2 ** 20
    rows = []
    for key, label in (("params", "parameters held"), ("grads", "gradients held"),
                       ("moments", "AdamW moments held"), ("rss_setup", "RSS after setup"),
                       ("peak_steps", "peak RSS of the steps")):
        ddp = max(r[key] for r in results["ddp"])
        fsdp = max(r[key] for r in results["fsdp"])
        rows.append([label, f"{ddp / mib:.0f}", f"{fsdp / mib:.0f}", f"{fsdp / ddp:.2f}"])
    print(f"{args.model}, {args.procs} processes, {args.device}, {args.dtype}, "
          f"{args.steps} steps of {args.batch}x{args.seq_len} tokens per process "
          "(largest process of each)")
    print_table(["per process", "DDP MiB", "FSDP MiB", "FSDP / DDP"], rows)


if __name__ == "__main__":
    main()
