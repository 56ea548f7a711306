"""How much of the last hidden state each way of spending a budget keeps, untrained.

The default path's first finetune re-decomposes all-MiniLM-L6-v2 by whitened SVD on 128
training rows and orders every component globally by output-energy share × measured
layer sensitivity per FLOP. This script rebuilds exactly that (plain convert, then
`redecompose_whitened` and the same sensitivity probe), then compares orderings by the
relative error ‖h_b − h_1‖² / ‖h_1‖² of the last hidden state at FLOPs budget b against
full rank, on held-out rows (fine-topics: every 4th sentence, as benchmarks/frontier.py):

* sensitivity probed at keep 0.1 (today) and at 0.25;
* energy shares alone (no sensitivity);
* the sensitivity raised to 0.5 and 1.5 (softer and harder weighting);
* today's ordering with mean compensation: each layer adds B[:, r:] A[r:] μ, the output
  its dropped components carry for the mean input μ of the calibration rows.

It is a proxy (no training, no head), cheap enough to screen ideas before a finetune.

    python benchmarks/allocation_probe.py --threads 1      # ~1 minute
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import minilm_classifier, print_table, text_data_args  # noqa: E402

import torch  # noqa: E402

BUDGETS = (0.1, 0.25, 0.5, 0.75)


def last_hidden(model, batches: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b, output_hidden_states=True).hidden_states[-1][
            b["attention_mask"].bool()] for b in batches])


def errors(model, batches: list[dict], reference: torch.Tensor) -> list[float]:
    from nsn_cli.nested.budget import set_budget, set_rank

    out = []
    for budget in BUDGETS:
        set_budget(model, budget)
        h = last_hidden(model, batches)
        out.append(float(((h - reference) ** 2).sum() / (reference ** 2).sum()))
    set_rank(model, fraction=1.0)
    return out


def input_means(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Mean input of every nested layer over the real tokens of `batches`."""
    from nsn_cli.nested.surgery import nested_layers

    sums, hooks, mask = {}, [], {}
    for name, layer in nested_layers(model).items():
        def hook(_m, args, _out, name=name):
            x = args[0][mask["now"].bool()]
            total, count = sums.get(name, (0.0, 0))
            sums[name] = (total + x.sum(0), count + x.shape[0])
        hooks.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            mask["now"] = b["attention_mask"]
            model(**b)
    for h in hooks:
        h.remove()
    return {n: total / count for n, (total, count) in sums.items()}


def compensated(model, means: dict[str, torch.Tensor]):
    """Forward hooks adding B[:, r:] A[r:] μ to each layer below its full rank."""
    from nsn_cli.nested.surgery import nested_layers

    def hook(layer, _args, out, mu):
        r = layer.rank
        return out if r >= layer.max_rank else out + layer.B[:, r:] @ (layer.A[r:] @ mu)
    return [layer.register_forward_hook(lambda m, a, o, mu=means[n]: hook(m, a, o, mu))
            for n, layer in nested_layers(model).items()]


def main() -> None:
    args = text_data_args(__doc__.splitlines()[0])
    import tempfile

    from nsn_cli.nested import allocation as al
    from nsn_cli.nested.calibrate import iterate, redecompose_whitened
    from nsn_cli.stages.calibration import calibration_batches
    from nsn_cli.stages.convert import convert_model

    model, tokenizer = minilm_classifier()
    model.eval()
    convert_model(model)
    rows = Path(args.data).read_text().splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        train, test = Path(tmp, "train.jsonl"), Path(tmp, "test.jsonl")
        train.write_text("\n".join(r for i, r in enumerate(rows) if i % 4 != 3) + "\n")
        test.write_text("\n".join(r for i, r in enumerate(rows) if i % 4 == 3) + "\n")
        calib = calibration_batches(str(train), tokenizer, "seq-cls", 128, 128)
        held = calibration_batches(str(test), tokenizer, "seq-cls", 10_000, 128)
    energies = redecompose_whitened(model, iterate(calib))
    reference = last_hidden(model, held)
    probe = calib[:al.PROBE_BATCHES]
    today = al.layer_sensitivity(model, probe, energies)
    orderings = {"sensitivity at keep 0.1 (today)": today,
                 "sensitivity at keep 0.25": al.layer_sensitivity(model, probe, energies, 0.25),
                 "energy shares alone": None,
                 "sensitivity ^ 0.5": {n: w ** 0.5 for n, w in today.items()},
                 "sensitivity ^ 1.5": {n: w ** 1.5 for n, w in today.items()}}
    table = {}
    for label, weights in orderings.items():
        al.attach_global(model, *al.global_order(model, energies, weights=weights))
        table[label] = errors(model, held, reference)
    al.attach_global(model, *al.global_order(model, energies, weights=today))
    hooks = compensated(model, input_means(model, calib))
    table["today + mean compensation"] = errors(model, held, reference)
    for h in hooks:
        h.remove()
    rows_held = sum(len(b["input_ids"]) for b in held)
    print(f"relative error of the last hidden state against full rank ({rows_held} held-out "
          "rows), by FLOPs budget")
    print_table(["ordering", *(f"{b:g}" for b in BUDGETS)],
                [[k, *(f"{v:.4f}" for v in vals)] for k, vals in table.items()])
    print(json.dumps(table))


if __name__ == "__main__":
    main()
