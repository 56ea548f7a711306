"""The `nsn` model type of lm-evaluation-harness: a project or factored export at a budget.

    lm_eval --model nsn --model_args pretrained=DIR,budget=0.5 --tasks hellaswag

`DIR` is an nsn project or a factored export (anything `nsn_cli.load` opens); `budget`
(a fraction of the dense model's FLOPs/token) or `rank_fraction` picks the ranks, and
`seq_len` the length FLOPs are counted at (default: the profile's, as `nsn export`).
Everything else is lm-eval's `hf` model (HFLM): same batching, same scoring, so the
numbers are those of `--model hf` on a merged export at the same setting.

lm-eval finds this class by its `@register_model("nsn")` once the module is imported.
lm-eval 0.4.x imports nothing outside its own package, so its CLI is started through
`nsn-lm-eval` (nsn_cli/cli/lm_eval.py), which imports this module first; versions that
scan the `lm_eval.models` entry-point group (declared in pyproject.toml) find it alone.

This module imports lm-eval at the top: import it only when lm-eval is wanted.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

NAME = "nsn"


def nested_setting(model, budget: float | None, rank_fraction: float | None,
                   seq_len: int) -> dict:
    """Put `model` at a budget or rank fraction (full rank when neither is given) and say
    where it landed: what lm-eval's results do not record by themselves."""
    from nsn_cli.nested.budget import cost_table, set_rank
    from nsn_cli.nested.fixed import fixed_layers
    from nsn_cli.nested.surgery import nested_layers
    from nsn_cli.stages.export import apply_setting

    if budget is None and rank_fraction is None:
        set_rank(model, fraction=1.0)
        table = cost_table(model)
        chosen = {"ranks": {}, "flops_fraction": table.flops(seq_len=seq_len)
                  / table.dense_flops(seq_len), "seq_len": seq_len}
    else:
        chosen = apply_setting(model, budget, rank_fraction, seq_len)
    table = cost_table(model)
    return {"budget": budget, "rank_fraction": rank_fraction, "seq_len": seq_len,
            "ranks": {name: layer.rank for name, layer  # an export's fixed layers too
                      in {**nested_layers(model), **fixed_layers(model)}.items()},
            "flops_per_token": table.flops(seq_len=seq_len),
            "flops_fraction": chosen["flops_fraction"]}


@register_model(NAME)
class NsnLM(HFLM):
    """lm-eval's HFLM around a nested model loaded with `nsn_cli.load`."""

    def __init__(self, pretrained: str, budget: float | None = None,
                 rank_fraction: float | None = None, seq_len: int | None = None,
                 dtype: str = "float32", device: str | None = None, **kwargs) -> None:
        from pathlib import Path

        from nsn_cli.errors import ProjectError
        from nsn_cli.project.loading import load
        from nsn_cli.project.manifest import read_manifest
        from nsn_cli.stages.export import default_seq_len
        from nsn_cli.stages.profile.setup import DTYPES
        from nsn_cli.stages.runtime import resolve_device

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        model, tokenizer = load(pretrained, device=resolve_device(device or "auto"),
                                dtype=DTYPES[dtype])
        if tokenizer is None:
            raise ProjectError(f"{pretrained}/model has no tokenizer files")
        seq_len = int(seq_len) if seq_len else default_seq_len(read_manifest(Path(pretrained)))
        self.nsn = {"pretrained": str(Path(pretrained).resolve()),
                    **nested_setting(model, budget, rank_fraction, seq_len)}
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)

    def get_model_info(self) -> dict:
        """HFLM's record plus the nested setting (lm-eval puts it in results['config'])."""
        info = super().get_model_info()
        info["nsn"] = dict(self.nsn)
        return info
