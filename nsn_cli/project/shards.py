"""Tensors split by rows over several safetensors files: written by many processes, read
back by any number of them. No pickle: torch.distributed.checkpoint's own format keeps its
index in a pickled `.metadata` file, so nsn writes this one instead.

    model-00000-of-00002.safetensors   process 0's rows of every sharded tensor, and
                                       every replicated tensor (process 0 only)
    model-00001-of-00002.safetensors   process 1's rows

Each file's safetensors metadata holds `nsn.rows`, JSON {name: [first_row, rows_in_whole]}:
where the rows it holds sit along dim 0 of the whole tensor (rows_in_whole is -1 for a
0-d tensor, stored whole). A reader assembles any row range of any tensor from whichever
files hold it, so what N processes wrote loads on M. A file without `nsn.rows` (a
checkpoint written by one process) reads as one shard holding every row.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch

from nsn_cli.errors import ProjectError, first_line

ROWS_KEY = "nsn.rows"


def shard_name(stem: str, rank: int, world: int) -> str:
    return f"{stem}-{rank:05d}-of-{world:05d}.safetensors"


# ---------------------------------------------------------------- which rows a process holds

def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this process's part, its first row in the whole tensor, rows of the whole tensor).

    FSDP2 shards every parameter (and AdamW's moments with it) along dim 0; a plain
    tensor is its own whole."""
    whole = tensor.shape[0] if tensor.dim() else -1
    if not is_sharded(tensor):
        return tensor, 0, whole
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not (isinstance(p, Shard) and p.dim == 0) for p in tensor.placements):
        raise ValueError(f"only row (dim 0) sharding is stored, got {tensor.placements}")
    local = tensor.to_local()
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,
                                                          tensor.placements)
    if tuple(shape) != tuple(local.shape):  # FSDP padded or reordered: refuse to guess
        raise ValueError(f"local shard {tuple(local.shape)} is not the expected {tuple(shape)}")
    return local, int(offset[0]) if local.dim() else 0, whole


def write_shard(path: Path, tensors: dict[str, torch.Tensor], replicated: bool) -> None:
    """This process's rows of `tensors`; plain (replicated) tensors only if `replicated`."""
    from safetensors.torch import save_file

    data, rows = {}, {}
    for name, tensor in tensors.items():
        if not is_sharded(tensor) and not replicated:
            continue
        local, first, whole = local_rows(tensor.detach())
        data[name] = local.detach().to("cpu").contiguous()
        rows[name] = [first, whole]
    save_file(data, str(path), metadata={"format": "pt", ROWS_KEY: json.dumps(rows)})


# ---------------------------------------------------------------- reading any rows back

class ShardReader:
    """Every tensor of a set of shard files (or whole files), readable by row range."""

    def __init__(self, paths: list[Path]):
        from safetensors import safe_open

        self._stack = ExitStack()
        self.pieces: dict[str, list[tuple[object, int, int]]] = {}  # name -> (file, first, whole)
        try:
            for path in paths:
                handle = self._stack.enter_context(safe_open(str(path), "pt"))
                meta = (handle.metadata() or {}).get(ROWS_KEY)
                rows = json.loads(meta) if meta else None
                for name in handle.keys():
                    if rows is None:
                        shape = handle.get_slice(name).get_shape()
                        first, whole = 0, (shape[0] if shape else -1)
                    else:
                        first, whole = rows[name]
                    self.pieces.setdefault(name, []).append((handle, first, whole))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.close()
            raise ProjectError(f"checkpoint shards {paths[0].parent} cannot be read: "
                               f"{first_line(exc)}") from None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self.pieces

    def rows(self, name: str) -> int:
        """Rows (dim 0) of the whole tensor; -1 for a 0-d one."""
        return self.pieces[name][0][2]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the whole tensor `name` (all of a 0-d tensor)."""
        pieces = self.pieces[name]
        whole = pieces[0][2]
        if whole < 0:
            return pieces[0][0].get_tensor(name)
        stop = whole if stop is None else stop
        parts, at = [], start
        for handle, first, _ in sorted(pieces, key=lambda p: p[1]):
            view = handle.get_slice(name)
            count = view.get_shape()[0]
            lo, hi = max(at, first), min(stop, first + count)
            if lo < hi:
                if lo != at:
                    break  # a gap: reported below
                parts.append(view[lo - first:hi - first])
                at = hi
        if at != stop:
            raise ProjectError(f"checkpoint shards hold rows {start}..{at} of {name}, "
                               f"not up to {stop}")
        if not parts:  # an empty range still has the right trailing shape and dtype
            empty = pieces[0][0].get_slice(name)[0:0]
            return empty
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def fill(target: torch.Tensor, reader: ShardReader, name: str) -> None:
    """Copy into `target` (a plain or sharded tensor) the rows of `name` it holds."""
    local, first, whole = local_rows(target)
    if reader.rows(name) != whole:
        raise ProjectError(f"checkpoint tensor {name} has {reader.rows(name)} rows, the model's "
                           f"has {whole}")
    value = reader.read(name, first, first + local.shape[0] if local.dim() else None)
    if tuple(value.shape) != tuple(local.shape):
        raise ProjectError(f"checkpoint tensor {name} is {tuple(value.shape)}, expected "
                           f"{tuple(local.shape)}")
    with torch.no_grad():
        local.copy_(value)


def like(param: torch.Tensor, reader: ShardReader, name: str) -> torch.Tensor:
    """A new tensor laid out like `param` (sharded the same way) holding `name`'s rows,
    or the whole saved tensor when it is not one of param's shape (AdamW's step)."""
    if reader.rows(name) < 0 or reader.rows(name) != (param.shape[0] if param.dim() else -1):
        return reader.read(name)
    local, first, _ = local_rows(param.detach())
    value = reader.read(name, first, first + local.shape[0]).to(local.device)
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value, param.device_mesh, param.placements,
                              shape=param.shape, stride=param.stride(), run_check=False)
