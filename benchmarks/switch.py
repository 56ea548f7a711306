"""What does changing the budget cost, next to one forward pass?

For each switch a → b on a converted model (random weights, real shape) the script times

* `set_budget(model, b)` itself: choosing the ranks and setting them;
* the extra time of the first forward after the switch over a warm forward at b: the
  layers that run dense re-merge B_r A_r there, once (incrementally from the matrix
  cached at the previous rank when that is cheaper);

each against one warm forward at b, for a prefill batch (8 × 128) and for one decoding
step with a KV cache (batch 1). Medians over rounds, min-max beside them.

Both inference paths are measured on copies of one converted model: `before` (factored
up to the break-even rank, merged above: a switch may re-merge) and `gauge` (today's
default: a switch builds the gauge-aligned pair for the new rank, or re-merges near
full rank).

    python benchmarks/switch.py --threads 1 --clock cpu   # GPT-2 small
    python benchmarks/switch.py --quick
"""

from __future__ import annotations

import copy

import torch

from common import (Spread, base_parser, build_model, is_decoder, machine_line, print_table,
                    setup, time_call)
from nsn_cli.nested.budget import set_budget
from nsn_cli.nested.layer import use_gauge
from nsn_cli.stages.convert import convert_model
from nsn_cli.errors import BudgetError

SWITCHES = ((1.0, 0.75), (0.75, 0.5), (0.5, 0.4), (0.4, 1.0), (1.0, 0.9), (0.9, 1.0),
            (0.9, 0.25), (0.25, 0.9))
QUICK_SWITCHES = ((1.0, 0.5), (0.5, 1.0), (1.0, 0.9))


def parse_args():
    parser = base_parser(__doc__.split("\n")[0], batch=8)
    parser.add_argument("--model", default="gpt2", help="gpt2 (default), bert or llama shape")
    parser.add_argument("--switches", default=None,
                        help="comma-separated a:b budget switches (default: a fixed set)")
    return parser.parse_args()


def prefill(model, ids):
    def run():
        with torch.inference_mode():
            model(input_ids=ids)
    return run


def decoder_step(model, prompt, token):
    """One cached decoding step; the cache is primed once and grows by a token a step."""
    with torch.inference_mode():
        state = {"cache": model(input_ids=prompt, use_cache=True).past_key_values}

    def run():
        with torch.inference_mode():
            out = model(input_ids=token, past_key_values=state["cache"], use_cache=True)
            state["cache"] = out.past_key_values
    return run


def one_switch(model, start, target, forward, device):
    """(set_budget seconds, first-forward extra seconds, warm forward seconds)."""
    set_budget(model, start)
    forward()
    forward()
    choose = time_call(lambda: set_budget(model, target), device)
    first = time_call(forward, device)
    warm = min(time_call(forward, device) for _ in range(2))
    return choose, max(first - warm, 0.0), warm


def measure(model, forward, switches, repeats, device):
    rows = []
    for start, target in switches:
        try:
            runs = [one_switch(model, start, target, forward, device) for _ in range(repeats)]
        except BudgetError as exc:  # a budget below this model's floor: say so, go on
            rows.append([f"{start:g} -> {target:g}", "below floor", "", "", "", "", ""])
            print(f"  {start:g} -> {target:g}: {exc}", flush=True)
            continue
        choose = Spread.of([c / w for c, _, w in runs])
        total = Spread.of([(c + e) / w for c, e, w in runs])
        rows.append([f"{start:g} -> {target:g}",
                     f"{Spread.of([c for c, _, _ in runs]).median * 1e3:.2f}",
                     f"{choose.median:.4f}",
                     f"{Spread.of([e for _, e, _ in runs]).median * 1e3:.1f}",
                     f"{total.median:.3f}", f"{total.min:.3f}-{total.max:.3f}",
                     f"{Spread.of([w for _, _, w in runs]).median * 1e3:.1f}"])
        print(f"  measured {start:g} -> {target:g}", flush=True)
    return rows


HEADERS = ["switch", "set_budget ms", "/ forward", "1st fwd extra ms",
           "(set+extra) / fwd", "min-max", "forward ms"]


def main():
    args = parse_args()
    setup(args)
    print(machine_line(args.device))
    repeats = args.repeats or (2 if args.quick else 3)
    switches = QUICK_SWITCHES if args.quick else SWITCHES
    if args.switches:
        switches = [tuple(float(b) for b in pair.split(":")) for pair in args.switches.split(",")]
    gauge = build_model(args.model).to(args.device)
    convert_model(gauge)
    before = copy.deepcopy(gauge)
    use_gauge(before, False)
    gen = torch.Generator().manual_seed(0)
    vocab = gauge.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(args.device)
    prompt = torch.randint(0, vocab, (1, 32), generator=gen).to(args.device)
    token = torch.randint(0, vocab, (1, 1), generator=gen).to(args.device)
    for name, model in (("before", before), ("gauge", gauge)):
        rows = measure(model, prefill(model, ids), switches, repeats, args.device)
        print(f"\n{args.model}, {name}: cost of a budget switch, prefill batch {args.batch} x "
              f"{args.seq_len}")
        print_table(HEADERS, rows)
        if is_decoder(args.model):
            rows = measure(model, decoder_step(model, prompt, token), switches, repeats,
                           args.device)
            print(f"\n{args.model}, {name}: cost of a budget switch, one decoding step "
                  "(KV cache, batch 1)")
            print_table(HEADERS, rows)


if __name__ == "__main__":
    main()
