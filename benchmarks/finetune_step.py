"""What does one multi-rank finetune step cost against one plain dense training step?

Both steps run through the same code (`nsn_cli.finetune.Trainer.train_step`: forward,
loss, backward, clipping, AdamW), on the same random token batch, timed side by side
in interleaved rounds (paired ratios, see common.py):

* dense: the ORIGINAL model (no nested layers), one rank, one forward/backward;
* nsn top: the converted model trained at its top rank only;
* nsn: the converted model with the default ladder and --ranks-per-step ranks (the top
  rank plus sampled lower ones; the draw depends on the step, so rounds see different
  lower ranks, as training does).

Target: nsn / dense ≤ 1.1 × ranks per step (a rank pass should cost no more than a
dense step, plus 10% for bookkeeping).

    python benchmarks/finetune_step.py                  # GPT-2 small shape, 4 × 128
    python benchmarks/finetune_step.py --layers 4 --quick
"""

from __future__ import annotations

import copy

import torch

from common import (base_parser, build_model, interleaved, machine_line, paired_ratios,
                    print_table, seconds, setup)
from nsn_cli.stages.config import FinetuneConfig
from nsn_cli.stages.convert import convert_model
from nsn_cli.project.data import TaskData
from nsn_cli.stages.finetune.distributed import Dist
from nsn_cli.stages.finetune.trainer import Trainer
from nsn_cli.stages.finetune.setup import Inputs
from nsn_cli.stages.finetune.objective import DEFAULT_LADDER, ladder_settings


def parse_args():
    parser = base_parser(__doc__.split("\n")[0], batch=4)
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (GPT-2: 12)")
    parser.add_argument("--ranks-per-step", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    return parser.parse_args()


def random_blocks(vocab: int, rows: int, seq_len: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(vocab, (seq_len,), generator=gen)} for _ in range(rows)]


def trainer_for(model, ladder, ranks_per_step: int, args, rows: list[dict]) -> Trainer:
    cfg = FinetuneConfig(project=".", data="random", seq_len=args.seq_len, steps=10_000,
                         batch_size=args.batch, ranks_per_step=ranks_per_step,
                         ladder=list(ladder), dtype=args.dtype, warmup=0.0,
                         fsdp=getattr(args, "fsdp", False))
    data = TaskData(rows, rows[:1])
    inputs = Inputs(model, None, "causal-lm", args.seq_len, data, list(ladder),
                    ladder_settings(model, list(ladder)), 0, {}, None, None)
    return Trainer(cfg, inputs, Dist(0, 1, torch.device(args.device)))


def stepper(trainer: Trainer):
    state = {"step": 0}

    def run():
        trainer.train_step(state["step"])
        state["step"] += 1

    return run


def main():
    args = parse_args()
    setup(args)
    repeats = args.repeats or (3 if args.quick else 6)
    print(machine_line(args.device))
    dense = build_model("gpt2")
    dense.config.n_layer = args.layers
    dense.transformer.h = dense.transformer.h[:args.layers]
    nested = copy.deepcopy(dense)
    convert_model(nested)
    rows = random_blocks(dense.config.vocab_size, 64, args.seq_len)
    candidates = {
        "dense": stepper(trainer_for(dense, [1.0], 1, args, rows)),
        "nsn top": stepper(trainer_for(nested, [1.0], 1, args, rows)),
        "nsn": stepper(trainer_for(copy.deepcopy(nested), DEFAULT_LADDER, args.ranks_per_step,
                                   args, rows)),
    }
    times = interleaved(candidates, repeats, warmup=1, device=args.device)
    ratios, secs = paired_ratios(times, "dense"), seconds(times)
    print(f"GPT-2 shape, {args.layers} layers, batch {args.batch} × {args.seq_len}, "
          f"{args.dtype}, {repeats} rounds, ladder {', '.join(f'{f:g}' for f in DEFAULT_LADDER)}")
    rows_out = [[name, f"{secs[name].median:.3f}", f"{ratios[name].median:.2f}",
                 f"{ratios[name].min:.2f}–{ratios[name].max:.2f}"] for name in candidates]
    print_table(["step", "seconds", "× dense", "range"], rows_out)
    target = 1.1 * args.ranks_per_step
    verdict = "meets" if ratios["nsn"].median <= target else "MISSES"
    print(f"multi-rank step ({args.ranks_per_step} ranks) = {ratios['nsn'].median:.2f} × dense: "
          f"{verdict} the target of ≤ {target:.1f} × dense")


if __name__ == "__main__":
    main()
