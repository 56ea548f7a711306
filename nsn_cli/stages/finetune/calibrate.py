"""Calibrate on the training data before step 0, for projects converted without --calib.

`nsn convert MODEL DIR` has no data yet, so it can only use plain SVD and the same
fraction of R in every layer. Whitened SVD and the global ordering are much better
below half the FLOPs (benchmarks/quality.py, benchmarks/frontier.py), and the data
arrives one command later: the first `nsn finetune` re-decomposes every layer from its
exact full-rank weight on the first training rows, builds the global ordering, and
records the result as its own stage ("calibrate") before training starts:
DIR/model/ with the new factors, DIR/allocation.json, and the manifest's
`decomposition` and `allocation`, all in one manifest write with their checksums.

Full rank computes the same function before and after. A resumed run finds the
manifest already calibrated and never does it again; so does any later finetune.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from torch import nn

from nsn_cli.nested.allocation import build_global
from nsn_cli.nested.calibrate import iterate, redecompose_whitened
from nsn_cli.nested.decompose import DAMPING
from nsn_cli.nested.state import nested_state
from nsn_cli.project.allocation_file import ALLOCATION_FILE, write_allocation
from nsn_cli.project.files import file_record, folder_records
from nsn_cli.project.manifest import MODEL_DIR, mark_unfinished, record_stage
from nsn_cli.project.staging import staging_dir
from nsn_cli.stages.calibration import DEFAULT_SAMPLES, row_batches

STAGE = "calibrate"


def needs_calibration(manifest: dict, enabled: bool, ladder: list[float]) -> bool:
    """Plain-SVD projects whose ladder trains something below full rank (a ladder of
    only the top point trains nothing the decomposition would change)."""
    method = (manifest.get("decomposition") or {}).get("method")
    return enabled and method == "svd" and len(ladder) > 1


def calibrate(model: nn.Module, train, pad_id: int, samples: int = DEFAULT_SAMPLES) -> dict:
    """Re-decompose `model` by whitened SVD on `train`'s first rows and attach the global
    ordering; returns what to record (rows, tokens, seconds, the ordering's criterion)."""
    start = time.perf_counter()
    batches = row_batches(train, pad_id, samples)
    energies = redecompose_whitened(model, iterate(batches))
    settings = build_global(model, energies, batches)
    return {"rows": sum(len(b["input_ids"]) for b in batches),
            "tokens": int(sum(b["attention_mask"].sum() for b in batches)),
            "criterion": settings.criterion, "seconds": round(time.perf_counter() - start, 2)}


def write_calibrated(project: Path, model: nn.Module, tokenizer, config: dict,
                     summary: dict) -> None:
    """DIR/model/, allocation.json and the manifest, as convert --calib would have."""
    from nsn_cli.project.loading import save_model

    settings = nested_state(model).settings
    mark_unfinished(project, "finetune")  # a kill before record_stage: run finetune again
    write_allocation(project / ALLOCATION_FILE, settings.names, settings.order,
                     settings.criterion)
    with staging_dir(project / MODEL_DIR) as tmp:
        save_model(model, tokenizer, tmp)
        for extra in (project / MODEL_DIR).iterdir():  # convert's model card and the like
            if extra.is_file() and not (tmp / extra.name).exists():
                shutil.copyfile(extra, tmp / extra.name)
    allocation = file_record(project / ALLOCATION_FILE, project)
    outputs = folder_records(project / MODEL_DIR, project) + [allocation]
    updates = {
        "decomposition": {
            "method": "whitened-svd", "split": "balanced-per-component", "damping": DAMPING,
            "from": "the full-rank weights, by nsn finetune",
            "calibration": {"data": config["data"], "split": config["split"],
                            "rows": summary["rows"], "tokens": summary["tokens"],
                            "seq_len": config["seq_len"]}},
        "allocation": {"method": "global", "criterion": settings.criterion,
                       "path": allocation["path"], "sha256": allocation["sha256"]},
    }
    record_stage(project, STAGE, config, outputs, summary, updates=updates)
