"""Hub-ready model cards (README.md) for a project's model/ and every export.

Written with huggingface_hub's ModelCard/ModelCardData, so the Hub (and
`ModelCard.load`) reads the metadata: `base_model` (the hub id, when the source was
one), `library_name`, `tags`, `pipeline_tag`, and under `nsn` the setting: budget,
FLOPs and parameter fractions. The text says how to load the folder (a nested one does
not load with plain transformers), the measured frontier when the project has a
profile (table, plot, and the lm-eval scores as the Hub's model-index), and the nsn
commands that made it, rebuilt from the configs nsn.json records.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

from nsn_cli.stages.config import STAGE_CONFIGS, default_of

CARD = "README.md"
PLOT = "frontier.png"
TAGS = ["nsn", "nested-subspace", "low-rank"]
PIPELINE = {"causal-lm": "text-generation", "seq-cls": "text-classification"}
POSITIONAL = {"convert": ("model", "out_dir"), "finetune": ("project",),
              "profile": ("project",), "frontier": ("project",), "export": ("project", "dest")}
STAGE_ORDER = ("convert", "finetune", "profile", "frontier", "export")
TABLE_COLUMNS = ("variant", "budget", "rank_fraction", "flops_fraction", "params_fraction")


def command_line(stage: str, config: dict) -> str:
    """The `nsn STAGE …` command a recorded config came from (flags that differ from the
    defaults only, in the dataclass's order)."""
    cls = STAGE_CONFIGS[stage]
    parts = ["nsn", stage] + [str(config.get(name)) for name in POSITIONAL[stage]]
    for f in fields(cls):
        if f.name in POSITIONAL[stage] or f.name not in config:
            continue
        value = config[f.name]
        if value == default_of(cls, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            parts += [flag, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        elif value is not None:
            parts += [flag, quoted(str(value))]
    return " ".join(parts)


def quoted(text: str) -> str:
    import shlex

    return shlex.quote(text)


def commands(manifest: dict, extra: dict[str, dict] | None = None) -> list[str]:
    """Every recorded stage's command, in pipeline order (`extra`: stages not yet recorded)."""
    stages = {name: stage.get("config", {}) for name, stage in manifest.get("stages", {}).items()}
    stages.update(extra or {})
    return [command_line(name, stages[name]) for name in STAGE_ORDER if name in stages
            and name in POSITIONAL]


def base_model(source: dict) -> str | None:
    """The hub id the project was converted from; None for a local directory."""
    if source.get("local") or not source.get("id"):
        return None
    return str(source["id"])


def source_line(source: dict) -> str:
    if base_model(source):
        revision = f" (revision `{source['revision']}`)" if source.get("revision") else ""
        return f"[{source['id']}](https://huggingface.co/{source['id']}){revision}"
    where = source.get("path") or source.get("id")
    return f"the local model directory `{Path(str(where)).resolve()}`"


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def profile_rows(project: Path) -> tuple[list[dict], list[str], dict]:
    """The measured rows of the project's profile (nsn and dense), the metric columns to
    show, and profile.json; nothing when the project has no profile."""
    import json

    import pandas as pd

    csv, doc = project / "profile" / "profile.csv", project / "profile" / "profile.json"
    if not csv.is_file():
        return [], [], {}
    frame = pd.read_csv(csv)
    info = json.loads(doc.read_text(encoding="utf-8")) if doc.is_file() else {}
    from nsn_cli.stages.evaluate import HIGHER_IS_BETTER

    lm_eval = ((info.get("run") or {}).get("lm_eval") or {}).get("higher_is_better", {})
    metrics = [c for c in frame.columns if c in HIGHER_IS_BETTER or c in lm_eval]
    frame = frame[frame["variant"].isin(["dense", "nsn"])]
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in frame.to_dict(orient="records")]
    return rows, metrics, info


def frontier_plot(project: Path, dest: Path) -> bool:
    """Draw the project's frontier into dest/frontier.png (False when there is no profile)."""
    from nsn_cli.stages.frontier import frontier_of, metric_for, read_profile
    from nsn_cli.stages.plotting import plot_frontier

    if not (project / "profile" / "profile.csv").is_file():
        return False
    profile, info = read_profile(project)
    metric, higher = metric_for(profile, None, info)
    figure = plot_frontier(profile, frontier_of(profile, metric, higher), metric, higher, info)
    figure.savefig(dest / PLOT, dpi=100)
    return True


def eval_results(rows: list[dict], info: dict, setting: dict, name: str) -> list:
    """lm-eval scores of the profiled point this card's setting is, as the Hub's
    model-index (only a measured point: nothing is interpolated)."""
    from huggingface_hub import EvalResult

    lm_eval = (info.get("run") or {}).get("lm_eval") or {}
    match = [r for r in rows if r["variant"] == "nsn"
             and r.get("budget") == setting.get("budget") is not None
             or (r["variant"] == "nsn" and setting.get("rank_fraction") is not None
                 and r.get("rank_fraction") == setting.get("rank_fraction"))]
    if not match or not lm_eval:
        return []
    out = []
    for column in lm_eval.get("higher_is_better", {}):
        task, metric = column.split("/", 1)
        if match[0].get(column) is not None:
            out.append(EvalResult(task_type=PIPELINE["causal-lm"], dataset_type=task,
                                  dataset_name=task, metric_type=metric,
                                  metric_value=float(match[0][column])))
    return out


def card_data(manifest: dict, kind: str, setting: dict | None, results: list):
    from huggingface_hub import ModelCardData

    nsn = {"format": kind, **{k: v for k, v in (setting or {}).items() if k != "ranks"}}
    return ModelCardData(
        base_model=base_model(manifest.get("source", {})),
        library_name="transformers" if kind == "merged" else "nsn-cli",
        tags=TAGS + [kind], pipeline_tag=PIPELINE.get(manifest.get("task")),
        model_name=Path(str(manifest.get("source", {}).get("id", "model"))).name + f"-nsn-{kind}"
        if results else None, eval_results=results or None, nsn=nsn)


LOADING = {
    "project": "This folder holds the nested factors of every layer (`nsn.safetensors`): "
               "plain `from_pretrained` finds no `model.safetensors` here and refuses, "
               "rather than loading random weights. Load the project folder (the parent of "
               "this one) with nsn:\n\n```python\nimport nsn_cli\nmodel, tokenizer = "
               "nsn_cli.load(\"PROJECT\")\nnsn_cli.set_budget(model, 0.5)  # any budget, "
               "at inference time\n```\n\nor score it with lm-eval: `nsn-lm-eval --model nsn "
               "--model_args pretrained=PROJECT,budget=0.5 --tasks …`.",
    "factored": "A factored nsn export: every nested layer keeps only the first r components "
                "of its factors (`model/nsn.safetensors`); plain `from_pretrained` refuses it. "
                "Load with nsn:\n\n```python\nimport nsn_cli\nmodel, tokenizer = "
                "nsn_cli.load(\"THIS_FOLDER\")\n```\n\nor `nsn-lm-eval --model nsn "
                "--model_args pretrained=THIS_FOLDER --tasks …`.",
    "merged": "A plain transformers model (each nested layer merged into a dense B_r A_r of "
              "its original class): it loads with `AutoModel*.from_pretrained` and no nsn "
              "code, and scores exactly like the nested model at this setting. Its layers "
              "have the dense shape, so it computes dense FLOPs; the factored export is the "
              "one that is smaller and cheaper.",
}


def card_text(manifest: dict, kind: str, setting: dict | None, project: Path | None,
              extra: dict[str, dict] | None, plot: bool) -> str:
    source = manifest.get("source", {})
    lines = [f"# {Path(str(source.get('id', 'model'))).name}, as a Nested Subspace Network "
             f"({kind})", "",
             f"Converted by [nsn](https://pypi.org/project/nsn-cli/) from {source_line(source)}: "
             "every targeted linear layer is factored as B[:, :r] A[:r, :], so one set of "
             "weights serves a range of compute budgets, chosen at inference time.", "",
             "## Loading", "", LOADING[kind], ""]
    if setting:
        lines += ["## This setting", "", markdown_table([setting], [
            k for k in ("budget", "rank_fraction", "seq_len", "flops_fraction",
                        "params", "params_fraction") if k in setting]), "",
                  "FLOPs fraction: FLOPs per token of the nested model at this setting over "
                  "the dense original's (analytic, at `seq_len`); params fraction: this "
                  "export's parameters over the dense original's.", ""]
    rows, metrics, _ = profile_rows(project) if project is not None else ([], [], {})
    if rows:
        lines += ["## Measured frontier (`nsn profile`)", "",
                  markdown_table(rows, list(TABLE_COLUMNS) + metrics), ""]
        if plot:
            lines += [f"![compute/quality frontier]({PLOT})", ""]
    lines += ["## How it was made", "", "```bash", *commands(manifest, extra), "```", ""]
    return "\n".join(lines)


def write_card(dest: Path, manifest: dict, kind: str, setting: dict | None = None,
               project: Path | None = None, extra: dict[str, dict] | None = None) -> Path:
    """dest/README.md (and dest/frontier.png when the project has a profile)."""
    from huggingface_hub import ModelCard

    from nsn_cli.project.files import atomic_write_text

    dest = Path(dest)
    plot = project is not None and frontier_plot(project, dest)
    rows, _, info = profile_rows(project) if project is not None else ([], [], {})
    results = eval_results(rows, info, setting or {}, kind) if setting else []
    data = card_data(manifest, kind, setting, results)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n"
                     + card_text(manifest, kind, setting, project, extra, plot))
    atomic_write_text(dest / CARD, str(card))
    return dest / CARD
