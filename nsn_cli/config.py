"""One dataclass per stage. Field docs are the single source of help text.

The CLI builds its options from these fields (see `help_for`), recipes validate their
keys against them, and each stage records its resolved config in `nsn.json`.
Only the standard library is imported here, so `nsn --help` stays instant.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields


def opt(default, help: str, **extra):
    """A config field with its help text attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ConvertConfig:
    model: str = opt(None, "Hub id (e.g. gpt2) or local directory of the pretrained model.")
    out_dir: str = opt(None, "Project directory to create.")
    task: str | None = opt(None, "causal-lm or seq-cls; guessed from the model when omitted.")
    targets: str = opt("all", "Layers to nest: all (every linear in the blocks), attn, mlp, "
                              "or a regex on module names.")
    max_rank: int | None = opt(None, "Cap on R, the largest rank kept per layer.")
    max_rank_fraction: float | None = opt(None, "Cap on R as a fraction of min(d_in, d_out).")
    svd: str = opt("auto", "SVD method: auto, exact or randomized.")
    calib: str | None = opt(None, "Calibration data (anything --data takes): factor each layer "
                                  "by activation-aware SVD on its real inputs.")
    calib_samples: int = opt(128, "Rows (or LM blocks) of the calibration data to use.")
    calib_seq_len: int = opt(128, "Tokens per calibration row or LM block.")
    allocation: str = opt("uniform", "Rank allocation across layers: uniform (the same fraction "
                                     "of R everywhere) or global (one nested ordering of all "
                                     "components by output energy per FLOP).")
    num_labels: int | None = opt(None, "Classes of a new classification head (seq-cls).")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = opt(False, "Allow the model repository to run its own code.")
    force: bool = opt(False, "Replace OUT_DIR if it exists and is not empty.")
    dry_run: bool = opt(False, "List the layers that would be nested; write nothing.")


STAGE_CONFIGS = {"convert": ConvertConfig}


def help_for(config_cls, name: str) -> str:
    for f in fields(config_cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def default_of(config_cls, name: str):
    for f in fields(config_cls):
        if f.name == name:
            return f.default_factory() if f.default is MISSING else f.default
    raise KeyError(name)


def to_dict(config) -> dict:
    return asdict(config)
