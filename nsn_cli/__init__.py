"""nsn: turn a pretrained Hugging Face model into a Nested Subspace Network.

The public Python API::

    import nsn_cli
    model, tokenizer = nsn_cli.load("out/")
    nsn_cli.set_rank(model, fraction=0.25)
    nsn_cli.set_budget(model, 0.5)
    nsn_cli.release_caches(model)   # after editing factors through param.data

    model = AutoModelForCausalLM.from_pretrained(...)   # or any HF model
    nsn_cli.convert_model(model)                          # nest it in place

Heavy imports (torch, transformers) happen on first use, so `nsn --help` stays instant.
"""

from nsn_cli.version import __version__

__all__ = ["load", "set_rank", "set_budget", "flops_per_token", "convert_model",
           "release_caches", "__version__"]

# public name -> the module that defines it
_EXPORTS = {"load": "nsn_cli.project.loading", "set_rank": "nsn_cli.nested.budget",
            "set_budget": "nsn_cli.nested.budget", "flops_per_token": "nsn_cli.nested.budget",
            "convert_model": "nsn_cli.stages.convert",
            "release_caches": "nsn_cli.nested.layer"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nsn_cli' has no attribute {name!r}")
