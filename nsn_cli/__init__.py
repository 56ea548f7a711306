"""nsn: turn a pretrained Hugging Face model into a Nested Subspace Network.

The public Python API::

    import nsn_cli
    model, tokenizer = nsn_cli.load("out/")
    nsn_cli.set_rank(model, fraction=0.25)
    nsn_cli.set_budget(model, 0.5)

Heavy imports (torch, transformers) happen on first use, so `nsn --help` stays instant.
"""

__version__ = "0.1.0"

__all__ = ["load", "set_rank", "set_budget", "flops_per_token", "__version__"]


def __getattr__(name):
    if name == "load":
        from .loading import load

        return load
    if name in ("set_rank", "set_budget", "flops_per_token"):
        from . import budget

        return getattr(budget, name)
    raise AttributeError(f"module 'nsn_cli' has no attribute {name!r}")
