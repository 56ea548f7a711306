"""lm-evaluation-harness tasks at every profiled point (`nsn profile --lm-eval-tasks`).

The same tasks run on the same nested model at every point: one lm-eval HFLM wraps it
and only the ranks change between runs (lm-eval reads the model's logits, so it scores
exactly the setting the ranks describe); the dense original gets its own HFLM and is the
reference row. Each task metric becomes a profile.csv column named `TASK/METRIC` (lm-eval's
own `METRIC,FILTER` key when the filter is not `none`), and its direction (lm-eval's
`higher_is_better`) is recorded in profile.json, so `nsn frontier --metric TASK/METRIC`
knows which way is better. lm-eval's raw results of each point are kept under
profile/lm_eval/ with the budget, ranks and FLOPs that lm-eval does not record.

lm-eval is an optional extra and slow to import: nothing here imports it at module level,
and a missing extra or an unknown task name is one line before any model loads.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from nsn_cli.errors import UsageError

RAW_DIR = "lm_eval"  # under profile/: one JSON of lm-eval results per point
INSTALL = "pip install 'nsn-cli[lm-eval]'"
NSN_KEYS = ("variant", "budget", "rank_fraction", "ranks", "flops_per_token", "flops_fraction",
            "params", "params_fraction")


def require_lm_eval() -> None:
    """lm-eval with its Hugging Face backend (the `hf` extra brings accelerate), or one line."""
    for module in ("lm_eval", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"lm-eval tasks need lm-evaluation-harness with its hf backend "
                             f"({module} is not installed): {INSTALL}")


def task_names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


@dataclass
class Harness:
    """What every point is scored on, and what the scoring found so far."""

    tasks: list[str]
    task_manager: object
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int = 1
    include_path: str | None = None
    higher_is_better: dict[str, bool] = field(default_factory=dict)  # column -> direction
    raw: dict[str, dict] = field(default_factory=dict)  # file name -> lm-eval results

    @property
    def columns(self) -> list[str]:
        return list(self.higher_is_better)


def prepare(cfg, task: str) -> Harness | None:
    """Check the extra and the task names (no model is loaded yet); None without tasks."""
    names = task_names(cfg.lm_eval_tasks)
    if not names:
        if cfg.lm_eval_include or cfg.lm_eval_limit is not None or cfg.lm_eval_fewshot is not None:
            raise UsageError("--lm-eval-include, --lm-eval-limit and --lm-eval-fewshot need "
                             "--lm-eval-tasks")
        return None
    if task != "causal-lm":
        raise UsageError(f"--lm-eval-tasks scores language models; this project is {task}")
    if cfg.lm_eval_limit is not None and cfg.lm_eval_limit <= 0:
        raise UsageError(f"--lm-eval-limit must be positive, got {cfg.lm_eval_limit}")
    if cfg.lm_eval_fewshot is not None and cfg.lm_eval_fewshot < 0:
        raise UsageError(f"--lm-eval-fewshot must be at least 0, got {cfg.lm_eval_fewshot}")
    include = cfg.lm_eval_include
    if include is not None and not Path(include).is_dir():
        raise UsageError(f"--lm-eval-include {include} is not a directory")
    require_lm_eval()
    return Harness(names, task_manager_for(names, include), cfg.lm_eval_fewshot,
                   cfg.lm_eval_limit, cfg.batch_size, include)


def task_manager_for(names: list[str], include: str | None):
    """lm-eval's TaskManager that knows every name, or one line naming the unknown ones.

    Indexing lm-eval's ~15,000 built-in task files takes minutes on a small machine, so
    when the include path alone defines every task the built-ins are not indexed.
    """
    from lm_eval.tasks import TaskManager

    if include is not None:
        local = TaskManager(include_path=include, include_defaults=False)
        if not unknown(local, names):
            return local
    manager = TaskManager(include_path=include)
    missing = unknown(manager, names)
    if missing:
        where = f" (nor in {include})" if include else " (add your own with --lm-eval-include)"
        raise UsageError(f"lm-eval has no task {', '.join(map(repr, missing))}{where}; "
                         "list them with `lm-eval ls tasks`")
    return manager


def unknown(manager, names: list[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [name for name in names if name not in known]


def lm_for(model, tokenizer, harness: Harness):
    """lm-eval's HFLM around the model object: the ranks set on it are what gets scored."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=harness.batch_size)


def score(lm, harness: Harness, row: dict, name: str) -> dict:
    """Run the tasks on `lm` as it stands; return the row's metric columns and keep the raw
    results (with what nsn knows about the point) under `name`."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    results = simple_evaluate(model=lm, tasks=list(harness.tasks), num_fewshot=harness.num_fewshot,
                              limit=harness.limit, task_manager=harness.task_manager,
                              batch_size=harness.batch_size)
    results.pop("samples", None)
    results["nsn"] = {key: row.get(key) for key in NSN_KEYS}
    harness.raw[name] = json.loads(json.dumps(results, default=handle_non_serializable))
    columns = metric_columns(results)
    for column, (_, higher) in columns.items():
        harness.higher_is_better.setdefault(column, higher)
    return {column: value for column, (value, _) in columns.items()}


def metric_columns(results: dict) -> dict[str, tuple[float, bool]]:
    """`TASK/METRIC` -> (value, higher is better) for every scored metric (no stderr)."""
    out = {}
    for task, metrics in results["results"].items():
        directions = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            if metric not in directions:
                continue  # a direction lm-eval does not state cannot rank a frontier
            out[f"{task}/{metric if filt == 'none' else key}"] = (float(value),
                                                                  bool(directions[metric]))
    return out


def raw_name(row: dict) -> str:
    """File name of one point's raw results: dense.json, nsn-budget-0.5.json, …"""
    if row["variant"] == "dense":
        return "dense.json"
    if row.get("budget") is not None:
        return f"{row['variant']}-budget-{row['budget']:g}.json"
    return f"{row['variant']}-rank-fraction-{row['rank_fraction']:g}.json"


def run_record(harness: Harness) -> dict:
    """What profile.json and nsn.json say about the lm-eval scoring."""
    from importlib.metadata import version

    return {"tasks": harness.tasks, "num_fewshot": harness.num_fewshot,
            "limit": harness.limit, "batch_size": harness.batch_size,
            "include_path": None if harness.include_path is None
            else str(Path(harness.include_path).resolve()),
            "lm_eval_version": version("lm_eval"), "higher_is_better": harness.higher_is_better,
            "raw": [f"{RAW_DIR}/{name}" for name in harness.raw]}
