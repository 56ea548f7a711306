"""stages/runtime.py: one --device and one context length for every stage."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from nsn_cli.errors import UsageError
from nsn_cli.stages.runtime import context_length, resolve_device, resolve_seq_len


@pytest.mark.parametrize("flag", ["meta", "nonsense", "cuda:x"])
def test_devices_other_than_cpu_and_cuda_are_refused(flag):
    with pytest.raises(UsageError, match="--device must be cpu, cuda, cuda:N or auto"):
        resolve_device(flag)


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(UsageError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_profile_refuses_the_devices_finetune_refuses():
    """profile's own copy accepted any torch device (meta ran, and failed much later)."""
    from nsn_cli.stages.config import ProfileConfig
    from nsn_cli.stages.profile.setup import validate

    with pytest.raises(UsageError, match="--device must be"):
        validate(replace(ProfileConfig(project="p"), device="meta"))


def test_context_length_reads_every_family_s_field():
    """profile's copy did not read `seq_length` (the name some configs use)."""
    assert context_length(SimpleNamespace(seq_length=64)) == 64
    assert context_length(SimpleNamespace(n_positions=32, seq_length=64)) == 32
    assert context_length(SimpleNamespace()) is None
    config = SimpleNamespace(seq_length=64)
    assert resolve_seq_len(None, config, 128) == 64
    with pytest.raises(UsageError, match="beyond the model's context of 64"):
        resolve_seq_len(65, config, 128)


def test_stages_use_the_one_definition():
    from nsn_cli.stages.finetune import distributed, setup
    from nsn_cli.stages.profile import run, setup as profile_setup

    assert setup.resolve_seq_len is run.resolve_seq_len is resolve_seq_len
    assert distributed.resolve_device is profile_setup.resolve_device is resolve_device


def test_calibration_pads_with_eos_when_there_is_no_pad_token(tokenizer):
    """The calibration copy of the pad-id fallback skipped EOS and padded with id 0."""
    import copy

    from tests.helpers import DATA
    from nsn_cli.stages.calibration import calibration_batches

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None and no_pad.eos_token_id not in (None, 0)
    batches = calibration_batches(str(DATA / "tiny_labels.jsonl"), no_pad, "seq-cls", 16, 64)
    padded = torch.cat([b["input_ids"][b["attention_mask"] == 0] for b in batches])
    assert len(padded) and (padded == no_pad.eos_token_id).all()
