"""The training loop's parts: one optimizer step of joint multi-rank training.

`Trainer.train_step` trains the top ladder point plus sampled lower ones on one global
batch, with the objective of `objective.py` (AdamW, warmup + cosine, clipping,
accumulation, float32 or bfloat16 autocast). The stage around it (logs, checkpoints, the
final model) is `stage.py`.

Everything a step does is a function of (seed, step): the rows it reads, the ladder
ranks it trains, the dropout masks. With the weights, optimizer state and log-variances
restored from a checkpoint, a resumed run therefore repeats the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nsn_cli.project import checkpoint as ckpt
from nsn_cli.nested.budget import apply_ranks
from nsn_cli.stages.config import FinetuneConfig
from nsn_cli.project.data import pad_batch
from nsn_cli.stages.finetune.distributed import Dist, shard, sync_context, wrap
from nsn_cli.errors import TrainingError
from nsn_cli.stages.finetune.setup import CHECKPOINTS, FINETUNE_DIR, Inputs
from nsn_cli.stages.finetune.objective import (RankWeights, distill_loss, hidden_loss,
                                               ranks_for_step, task_loss, teacher_from)
from nsn_cli.project.safety import count_nonfinite, refuse_nonfinite
from nsn_cli.project.shards import is_sharded, local_rows
from nsn_cli.nested.layer import transient

MIN_LR_RATIO = 0.1  # cosine decays to a tenth of the peak


@dataclass
class StepReport:
    step: int  # optimizer steps done
    losses: dict[float, float]  # ladder fraction -> task loss at that rank
    distill: dict[float, float]  # ladder fraction -> KL to the top rank (+ the hidden-state
    # term with --hidden-distill; 0 without --distill)
    weights: dict[float, float]  # ladder fraction -> its factor in the objective
    lr: float
    tokens: int  # data tokens in the step, over all processes
    tokens_per_s: float


# ---------------------------------------------------------------- schedule and data order

def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warmup over the first `warmup`·steps steps, then cosine decay to a tenth."""
    warm = int(round(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


class RowStream:
    """An endless stream of row indices: one seeded permutation per epoch, back to back."""

    def __init__(self, rows: int, seed: int):
        self.rows, self.seed = rows, seed
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(self.rows, generator=gen).tolist()}
        return self._orders[epoch]

    def take(self, start: int, count: int) -> list[int]:
        return [self.order(p // self.rows)[p % self.rows] for p in range(start, start + count)]


def seed_step(seed: int, step: int, rank: int) -> None:
    """Dropout draws depend only on (seed, step, process), never on what ran before."""
    torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


# ---------------------------------------------------------------- the loop

class Trainer:
    """One training run: the model (DDP-wrapped if needed), optimizer and logs."""

    def __init__(self, cfg: FinetuneConfig, inputs: Inputs, dist: Dist):
        self.cfg, self.inputs, self.dist = cfg, inputs, dist
        # A bf16 project trains fp32 master weights and is written back in bf16.
        self.storage_dtype = next((p.dtype for p in inputs.model.parameters()
                                   if p.is_floating_point()), torch.float32)
        self.model = inputs.model.to(dist.device, dtype=torch.float32).train()
        self.sharded = cfg.fsdp  # FSDP: every process evaluates and writes checkpoints
        self.net = shard(self.model, dist, cfg.dtype) if self.sharded else wrap(self.model, dist)
        self.weights = RankWeights(len(inputs.ladder), cfg.objective).to(dist.device)
        self.optimizer = build_optimizer(self.model, self.weights, cfg)
        self.stream = RowStream(len(inputs.data.train), cfg.seed)
        self.pad_id = inputs.pad_id
        self.dir = Path(cfg.project) / FINETUNE_DIR
        self.state: dict = {}  # carried in checkpoints: eval before training, tokens seen
        self.eval_batches = None

    # -------------------------------------------------------- one step

    def train_step(self, step: int) -> StepReport:
        """Optimizer step number `step` (0-based); returns what it measured."""
        cfg, size = self.cfg, len(self.inputs.ladder)
        start = time.perf_counter()
        seed_step(cfg.seed, step, self.dist.rank)
        picked = ranks_for_step(size, cfg.ranks_per_step, cfg.seed, step, cfg.sandwich)
        lr = self.set_lr(step)
        sums = torch.zeros(2 * size + 1, dtype=torch.float64)  # losses, distill, tokens
        for micro in range(cfg.grad_accum):
            batch = self.micro_batch(step, micro)
            sums[-1] += float(batch["attention_mask"].sum())
            teacher = None
            for j, index in enumerate(picked):
                last = micro == cfg.grad_accum - 1 and j == len(picked) - 1
                loss, kl, out = self.rank_pass(index, batch, teacher, len(picked), last)
                if cfg.distill and j == 0 and len(picked) > 1:
                    teacher = teacher_from(self.inputs.task, out.logits, out.hidden_states,
                                           batch["attention_mask"])
                sums[index] += loss / cfg.grad_accum
                sums[size + index] += kl / cfg.grad_accum
        self.dist.mean_(sums[:-1])
        self.dist.sum_(sums[-1:])
        fractions = self.inputs.ladder
        used = {fractions[k]: self.weights.weight(k, len(picked)) for k in picked}
        self.finish_step(step, sums, picked)
        seconds = time.perf_counter() - start
        return StepReport(step + 1, {fractions[k]: float(sums[k]) for k in picked},
                          {fractions[k]: float(sums[size + k]) for k in picked},
                          used, lr, int(sums[-1]), float(sums[-1]) / seconds)

    def rank_pass(self, index: int, batch: dict, teacher, active: int, sync: bool):
        """Forward and backward at one ladder rank; returns (loss, distill, the outputs)."""
        apply_ranks(self.model, self.inputs.settings[index])
        weight = self.cfg.hidden_distill if self.cfg.distill else 0.0  # only a teacher uses it
        with sync_context(self.net, sync), self.autocast():
            out = self.net(**self.inputs.forward_args(batch), output_hidden_states=weight > 0)
            loss = task_loss(self.inputs.task, out.logits, batch)
            kl = torch.zeros((), device=loss.device)
            if teacher is not None:
                kl = distill_loss(self.inputs.task, out.logits, teacher, batch)
                if weight > 0:
                    kl = kl + weight * hidden_loss(out.hidden_states, teacher, batch)
            term = self.weights.term(index, loss + kl, active) / self.cfg.grad_accum
            term.backward()
        return float(loss.detach()), float(kl.detach()), out

    def finish_step(self, step: int, sums: torch.Tensor, picked: list[int]) -> None:
        """Stop on a non-finite loss or gradient (before any update), then clip and step."""
        size = len(self.inputs.ladder)
        for index in picked:
            value = float(sums[index]) + float(sums[size + index])
            if not math.isfinite(value):
                self.stop(f"the loss at ladder budget {self.inputs.ladder[index]:g} became "
                          f"{value} at step {step + 1}")
        if self.weights.log_vars.grad is not None:
            self.dist.mean_(self.weights.log_vars.grad)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                              self.cfg.clip if self.cfg.clip > 0 else math.inf)
        norm = norm.full_tensor() if is_sharded(norm) else norm
        if not math.isfinite(float(norm)):
            self.stop(f"the gradient norm became {float(norm)} at step {step + 1}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def stop(self, what: str) -> None:
        raise TrainingError(f"{what}; training stopped and no weights were updated (last good "
                            f"checkpoint: {self.last_checkpoint_name()}); try a lower --lr")

    def micro_batch(self, step: int, micro: int) -> dict:
        """This process's shard of global micro-batch (step, micro)."""
        cfg = self.cfg
        share = cfg.batch_size // self.dist.world
        first = (step * cfg.grad_accum + micro) * cfg.batch_size + self.dist.rank * share
        train = self.inputs.data.train
        batch = pad_batch([train[i] for i in self.stream.take(first, share)], self.pad_id)
        return {k: v.to(self.dist.device) for k, v in batch.items()}

    def set_lr(self, step: int) -> float:
        lr = self.cfg.lr * lr_factor(step, self.cfg.steps, self.cfg.warmup)
        for group in self.optimizer.param_groups:
            if group.get("name") != "log_vars":
                group["lr"] = lr
        return lr

    def autocast(self):
        if self.cfg.dtype == "bfloat16":
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -------------------------------------------------------- evaluation

    def evaluate(self, indices: list[int]) -> dict[float, dict]:
        """Held-out metrics at the given ladder points (process 0 only; with FSDP every
        process, as each forward all-gathers the weights)."""
        from nsn_cli.stages.evaluate import batches, evaluate

        if self.eval_batches is None:
            split = self.inputs.data.eval
            split = split.select(range(min(self.cfg.eval_samples, len(split))))
            self.eval_batches = batches(split, self.cfg.batch_size, self.pad_id, self.dist.device)
        results = {}
        for index in indices:
            apply_ranks(self.model, self.inputs.settings[index])
            # Sharded weights are all-gathered into reused buffers: cache no merged copy.
            with self.autocast(), transient() if self.sharded else contextlib.nullcontext():
                results[self.inputs.ladder[index]] = evaluate(
                    self.model, self.eval_batches, self.inputs.task).metrics
        return results

    def periodic_eval_indices(self) -> list[int]:
        """Lowest, middle and top ladder points (all of them on a short ladder)."""
        size = len(self.inputs.ladder)
        return sorted({0, size // 2, size - 1})

    # -------------------------------------------------------- checkpoints

    def save(self, step: int) -> Path:
        """Checkpoint `step` (collective with FSDP: each process writes its shards)."""
        self.refuse_nonfinite(f"checkpoint {step}")  # never over good checkpoints
        state = {"samples_seen": step * self.cfg.batch_size * self.cfg.grad_accum,
                 "train_rows": len(self.inputs.data.train),
                 "config": self.inputs.resolved, "ladder_ranks": self.inputs.settings,
                 **self.state}
        if self.sharded:
            return ckpt.save_sharded(self.dir / CHECKPOINTS, step, self.model, self.optimizer,
                                     self.weights.log_vars, state, self.dist,
                                     keep=self.cfg.keep_checkpoints,
                                     tokenizer=self.inputs.tokenizer)
        return ckpt.save_checkpoint(self.dir / CHECKPOINTS, step, self.model,
                                    self.optimizer, self.weights.log_vars, state,
                                    keep=self.cfg.keep_checkpoints,
                                    tokenizer=self.inputs.tokenizer)

    def refuse_nonfinite(self, what: str) -> None:
        """TrainingError (on every process) if any weight is NaN/inf: each process looks
        at its own shard, then they agree."""
        if not self.sharded:
            return refuse_nonfinite(self.model, what)
        bad = sum(count_nonfinite(local_rows(p.detach())[0]) for p in self.model.parameters())
        if self.dist.any_(bad > 0):
            raise TrainingError(f"refusing to save {what}: weights hold NaN/inf values; the "
                                "last good weights on disk are kept")

    def final_tensors(self) -> tuple[dict, dict] | None:
        """(name -> whole tensor in the project's dtype, tied aliases) on process 0, None
        elsewhere; with FSDP each tensor is gathered in turn (collective), so no process
        ever holds more than one whole tensor beyond its shards."""
        tensors, aliases = ckpt.model_tensors(self.model)
        out = {}
        for name, tensor in tensors.items():
            whole = tensor.detach()
            whole = whole.full_tensor() if is_sharded(whole) else whole
            if self.dist.is_main:
                dtype = self.storage_dtype if whole.is_floating_point() else whole.dtype
                out[name] = whole.to("cpu", dtype).contiguous()
        return (out, aliases) if self.dist.is_main else None

    def last_checkpoint_name(self) -> str:
        found = ckpt.find_latest(self.dir / CHECKPOINTS)
        return str(found.path) if found else "none yet"

    def restore(self, checkpoint: ckpt.Checkpoint) -> int:
        ckpt.restore(checkpoint, self.model, self.optimizer, self.weights.log_vars)
        self.state = {k: checkpoint.state[k] for k in ("before", "tokens") if k in checkpoint.state}
        return checkpoint.step


def build_optimizer(model, weights: RankWeights, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW; decay on matrices only; the log-variances get their own lr and no decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay,
               "name": "matrices"},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0,
               "name": "vectors"}]
    if weights.log_vars.requires_grad:
        groups.append({"params": [weights.log_vars], "lr": cfg.scale_lr, "weight_decay": 0.0,
                       "name": "log_vars"})
    return torch.optim.AdamW(groups, lr=cfg.lr)
