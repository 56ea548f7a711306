"""Task metrics on a held-out split: one code path for nested and plain HF models.

* causal-lm: perplexity = exp(mean negative log-likelihood per predicted token), over
  the packed `seq_len` blocks; every block predicts its tokens 2..seq_len from the
  ones before it, so one block of L tokens contributes L − 1 predictions. The NLL is
  summed in float64 over all predictions, then divided once (a mean over tokens, not
  a mean of per-batch means).
* seq-cls: accuracy and macro-F1 (the unweighted mean of per-class F1 over the
  classes that occur in the labels or the predictions, as scikit-learn defines it).

`evaluate` takes any HF model, so the original model, the nested model at any rank
and a merged export are all measured by exactly the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nsn_cli.project.data import pad_batch
from nsn_cli.errors import DataError
from nsn_cli.nested.layer import evaluating

METRICS = {"causal-lm": ("perplexity", "nll"), "seq-cls": ("accuracy", "macro_f1")}
# The metric a frontier is drawn for, and whether more of it is better.
PRIMARY = {"causal-lm": "perplexity", "seq-cls": "accuracy"}
HIGHER_IS_BETTER = {"perplexity": False, "nll": False, "accuracy": True, "macro_f1": True}


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: int  # blocks (causal-lm) or rows (seq-cls) evaluated
    tokens: int  # predicted tokens (causal-lm) or input tokens (seq-cls)


def batches(dataset, batch_size: int, pad_id: int, device) -> list[dict]:
    """The split as a list of model-ready batches (built once, reused at every rank)."""
    rows = [dataset[i] for i in range(len(dataset))]
    out = []
    for start in range(0, len(rows), batch_size):
        batch = pad_batch(rows[start:start + batch_size], pad_id)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def forward_kwargs(task: str) -> dict:
    """No KV cache for causal LMs: nothing is generated, and the cache costs memory."""
    return {"use_cache": False} if task == "causal-lm" else {}


def evaluate(model: nn.Module, batch_list: list[dict], task: str,
             label_map: torch.Tensor | None = None) -> EvalResult:
    """Evaluate `model` on pre-built batches; `label_map` maps data label ids to model ids."""
    with evaluating(model):
        if task == "causal-lm":
            return causal_lm_metrics(model, batch_list)
        return classification_metrics(model, batch_list, label_map)


def causal_lm_metrics(model: nn.Module, batch_list: list[dict]) -> EvalResult:
    total_nll, predicted, samples = 0.0, 0, 0
    extra = forward_kwargs("causal-lm")
    for batch in batch_list:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask, **extra).logits
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                              targets.reshape(-1), ignore_index=-100, reduction="sum")
        total_nll += float(nll.double())
        predicted += int((targets != -100).sum())
        samples += ids.shape[0]
    if predicted == 0:
        raise DataError("the held-out split has no tokens to predict")
    mean_nll = total_nll / predicted
    return EvalResult({"perplexity": safe_exp(mean_nll), "nll": mean_nll}, samples, predicted)


def safe_exp(x: float) -> float:
    return math.exp(x) if x < 709 else math.inf


def classification_metrics(model: nn.Module, batch_list: list[dict],
                           label_map: torch.Tensor | None) -> EvalResult:
    truth, predicted, tokens = [], [], 0
    for batch in batch_list:
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        truth.append(labels if label_map is None else label_map.to(labels.device)[labels])
        predicted.append(logits.argmax(dim=-1))
        tokens += int(batch["attention_mask"].sum())
    y_true, y_pred = torch.cat(truth).cpu(), torch.cat(predicted).cpu()
    return EvalResult({"accuracy": float((y_true == y_pred).double().mean()),
                       "macro_f1": macro_f1(y_true, y_pred)}, len(y_true), tokens)


def macro_f1(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    """Mean per-class F1 over the classes present in either the labels or the predictions."""
    scores = []
    for cls in torch.unique(torch.cat([y_true, y_pred])).tolist():
        tp = int(((y_pred == cls) & (y_true == cls)).sum())
        fp = int(((y_pred == cls) & (y_true != cls)).sum())
        fn = int(((y_pred != cls) & (y_true == cls)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(sum(scores) / len(scores)) if scores else 0.0


def label_mapping(model: nn.Module, data_labels: list[str] | None) -> torch.Tensor | None:
    """Map the data's label ids (sorted label names) onto the model's output ids.

    A model whose config names its classes (finetune writes id2label) is matched by
    name; a model with default names (LABEL_0 …) must have exactly as many outputs.
    """
    if data_labels is None:
        return None
    config = model.config
    names = [str(config.id2label[i]) for i in range(config.num_labels)] \
        if getattr(config, "id2label", None) else []
    if sorted(names) == sorted(data_labels):
        index = {name: i for i, name in enumerate(names)}
        return torch.tensor([index[name] for name in data_labels])
    default = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    if default and config.num_labels == len(data_labels):
        return None
    raise DataError(f"the data has labels {', '.join(data_labels[:6])} but the model predicts "
                    f"{', '.join(names[:6]) or config.num_labels} (finetune on this data first)")
