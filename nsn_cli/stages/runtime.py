"""What the stages that run a model settle the same way: the device and the sequence length.

`--device` means one thing everywhere it is taken (cpu, cuda, cuda:N or auto), and a
model's context length is read from the same config fields, so finetune and profile
cannot disagree about either.
"""

from __future__ import annotations

import torch

from nsn_cli.errors import UsageError

DEVICES = "cpu, cuda, cuda:N or auto"
# Config fields that hold a model's context length, by family (GPT-2: n_positions, ...).
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """cpu, cuda (this process's GPU: `local_rank` under torchrun), cuda:N or auto."""
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    if flag == "cuda":
        flag = f"cuda:{local_rank}"
    try:
        device = torch.device(flag)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device must be {DEVICES}, got {flag!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be {DEVICES}, got {flag!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {flag}: CUDA is not available on this machine")
    return device


def context_length(config) -> int | None:
    """The most tokens the model takes in one sequence, if its config says."""
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_seq_len(requested: int | None, config, default: int) -> int:
    """`requested`, refused beyond the model's context; unset: `default`, capped by it."""
    context = context_length(config)
    if requested is None:
        return min(default, context or default)
    if context is not None and requested > context:
        raise UsageError(f"--seq-len {requested} is beyond the model's context of {context} "
                         "tokens")
    return requested
