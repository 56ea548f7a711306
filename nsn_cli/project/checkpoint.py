"""Training checkpoints: written atomically, found through an index, never pickled.

    finetune/checkpoints/
      index.json            {"latest": "step-000200", "checkpoints": [...]} (written last)
      step-000200/
        config.json         the model's HF config (the architecture to rebuild)
        tokenizer/          the tokenizer files (a resume never needs DIR/model/)
        model.safetensors   every model tensor (tied tensors stored once)
        optimizer.safetensors  optimizer state tensors, log-variances, torch RNG state
        state.json          step, data position, log-variances, optimizer scalars and
                            param groups, the training config, sizes of the files above

A sharded run (`--fsdp`) writes, instead of the two .safetensors files, one pair per
process: model-RRRRR-of-WWWWW.safetensors and optimizer-RRRRR-of-WWWWW.safetensors, each
holding that process's rows of every tensor (see `shards.py`), and state.json records
`"shards": W`. Either kind restores onto any number of processes, sharded or not.

A checkpoint is built in a hidden sibling directory and renamed into place, then the
index is rewritten (atomically) to name it. The newest complete checkpoint is the one
the index names, not whatever a directory listing shows: a crash at any moment leaves
either the previous index (and a stray directory that is cleaned up later) or the new
one. `state.json` records each file's size, so a damaged checkpoint is skipped rather
than loaded.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nsn_cli.errors import ProjectError, first_line
from nsn_cli.project.files import atomic_write_json, tensor_bytes, writing
from nsn_cli.project.shards import ShardReader, fill, is_sharded, like, shard_name, write_shard
from nsn_cli.project.staging import staging_dir

INDEX = "index.json"
STATE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT = 1


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class Checkpoint:
    path: Path
    state: dict  # the parsed state.json

    @property
    def step(self) -> int:
        return int(self.state["step"])


# ---------------------------------------------------------------- optimizer state

def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, json) holding an optimizer's state_dict without pickle."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):  # a sharded moment stays sharded (written per process)
                tensors[f"state.{param_id}.{key}"] = (value.detach() if is_sharded(value)
                                                      else value.detach().contiguous().cpu())
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = value
    for param_id, entry in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- save

def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    log_vars: torch.Tensor, state: dict, keep: int = 2,
                    tokenizer=None) -> Path:
    """Write checkpoint `step` under `root` atomically, point the index at it, prune."""
    from safetensors.torch import save_file, save_model

    root = Path(root)
    final = root / checkpoint_name(step)
    with staging_dir(final) as tmp:
        model.config.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        with writing(tmp / MODEL_FILE, tensor_bytes(model.state_dict().values())):
            save_model(model, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        tensors, optimizer_meta = flatten_optimizer(optimizer)
        tensors["objective.log_vars"] = log_vars.detach().cpu().contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        with writing(tmp / OPTIMIZER_FILE, tensor_bytes(tensors.values())):
            save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_json(tmp / STATE, {"format": FORMAT, **state, "step": step,
                                        "log_vars": log_vars.detach().cpu().tolist(),
                                        "optimizer": optimizer_meta, "files": sizes})
    publish(root, final, keep)
    return final


def publish(root: Path, final: Path, keep: int) -> None:
    """Point the index at the checkpoint just renamed into place; drop the oldest."""
    names = [n for n in read_index(root) if n != final.name and (root / n).is_dir()]
    names.append(final.name)
    keep = max(1, keep)
    kept, dropped = names[-keep:], names[:-keep]
    atomic_write_json(root / INDEX, {"format": FORMAT, "latest": final.name,
                                     "checkpoints": kept})
    for name in dropped:
        shutil.rmtree(root / name, ignore_errors=True)


def model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(name -> tensor of everything a model saves, dropped name -> kept name).

    Tied tensors are kept once under the first of their names in sorted order, as
    safetensors' save_model does, so either writer's files read the same way."""
    groups: dict[int, list[str]] = {}
    values = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
        values[name] = tensor
    kept, aliases = {}, {}
    for names in groups.values():
        first, *rest = sorted(names)
        kept[first] = values[first]
        aliases.update({other: first for other in rest})
    return kept, aliases


# ---------------------------------------------------------------- sharded save

def save_sharded(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 log_vars: torch.Tensor, state: dict, group, keep: int = 2,
                 tokenizer=None) -> Path:
    """Checkpoint `step` written by every process of `group`, each its own rows.

    Collective: every process calls it. `group` has rank, world, barrier() and
    share_text(text) (process 0's text, on every process). Process 0 makes the staging
    directory, writes config, tokenizer and state.json (after everyone's files are
    there, with their sizes), renames it into place and updates the index; a kill at
    any moment leaves the previous index, as for `save_checkpoint`.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tensors, _ = model_tensors(model)
    moments, optimizer_meta = flatten_optimizer(optimizer)
    moments["objective.log_vars"] = log_vars.detach().cpu().contiguous()
    moments["rng.torch"] = torch.get_rng_state()

    def write(tmp: Path) -> None:
        main = group.rank == 0
        write_shard(tmp / shard_name("model", group.rank, group.world), tensors, main)
        write_shard(tmp / shard_name("optimizer", group.rank, group.world), moments, main)

    if group.rank != 0:
        write(Path(group.share_text(None)))
        group.barrier()  # every shard is written
        group.barrier()  # the index names the new checkpoint
        return final
    with staging_dir(final) as tmp:
        group.share_text(str(tmp))
        model.config.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        write(tmp)
        group.barrier()
        sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_json(tmp / STATE, {"format": FORMAT, **state, "step": step,
                                        "shards": group.world,
                                        "log_vars": log_vars.detach().cpu().tolist(),
                                        "optimizer": optimizer_meta, "files": sizes})
    publish(root, final, keep)
    group.barrier()
    return final


# ---------------------------------------------------------------- find and load

def read_index(root: Path) -> list[str]:
    """Checkpoint names the index lists, oldest first ([] when there is no usable index)."""
    try:
        doc = json.loads((Path(root) / INDEX).read_text(encoding="utf-8"))
        names = doc["checkpoints"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return []
    return [n for n in names if isinstance(n, str) and n.startswith("step-") and "/" not in n]


def complete(path: Path) -> dict | None:
    """The parsed state.json of a checkpoint whose files are all there, else None."""
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        sizes = state["files"]
        ok = all((path / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    return state if ok and state.get("format") == FORMAT else None


def find_latest(root: Path) -> Checkpoint | None:
    """The newest complete checkpoint the index names (None if there is none)."""
    for name in reversed(read_index(root)):
        state = complete(Path(root) / name)
        if state is not None:
            return Checkpoint(Path(root) / name, state)
    return None


def clean_strays(root: Path) -> None:
    """Remove half-written staging directories and checkpoints the index does not list."""
    root = Path(root)
    if not root.is_dir():
        return
    listed = set(read_index(root))
    for child in root.iterdir():
        stray = child.name.startswith(".") or (child.name.startswith("step-")
                                               and child.name not in listed)
        if child.is_dir() and stray:
            shutil.rmtree(child, ignore_errors=True)


def read_config(checkpoint: Checkpoint):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(checkpoint.path), trust_remote_code=False)


def weight_files(checkpoint: Checkpoint, stem: str) -> list[Path]:
    """The checkpoint's model or optimizer files: one whole file, or one per process."""
    world = checkpoint.state.get("shards")
    if world is None:
        return [checkpoint.path / f"{stem}.safetensors"]
    return [checkpoint.path / shard_name(stem, r, int(world)) for r in range(int(world))]


def restore(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer,
            log_vars: torch.Tensor) -> None:
    """Load weights, optimizer state, log-variances and the torch RNG state in place.

    The checkpoint may have been written whole or by any number of processes, and the
    model may be sharded (FSDP) or not: each tensor gets the rows this process holds."""
    tensors, aliases = model_tensors(model)
    with ShardReader(weight_files(checkpoint, "model")) as reader:
        found = {aliases.get(n, n) for n in reader.pieces}
        missing, unexpected = set(tensors) - found, found - set(tensors)
        if missing or unexpected:
            raise ProjectError(f"checkpoint {checkpoint.path} does not match the model "
                               f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
        saved = {aliases.get(n, n): n for n in reader.pieces}
        for name, tensor in tensors.items():
            fill(tensor.detach(), reader, saved[name])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with ShardReader(weight_files(checkpoint, "optimizer")) as reader:
        with torch.no_grad():
            log_vars.copy_(reader.read("objective.log_vars"))
        torch.set_rng_state(reader.read("rng.torch"))
        moments = {}
        for name in reader.pieces:
            if name.startswith("state."):
                index = int(name.split(".")[1])
                if index >= len(params):
                    raise ProjectError(f"checkpoint {checkpoint.path} does not match the "
                                       "optimizer (more parameters than the model has)")
                moments[name] = like(params[index], reader, name)
    optimizer.load_state_dict(unflatten_optimizer(moments, checkpoint.state["optimizer"]))


def reset(root: Path) -> None:
    """Forget every checkpoint (a fresh run); the index goes first so none is half-found."""
    root = Path(root)
    (root / INDEX).unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
