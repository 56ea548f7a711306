"""errors.first_line: how every foreign exception's message enters one of nsn's."""

import pytest
import torch

from nsn_cli.errors import ProjectError, first_line


@pytest.mark.parametrize("exc, expected", [
    (ValueError("bad value\nTraceback detail"), "bad value"),
    (ValueError("\n  spaced first line  \nmore"), "spaced first line"),
    (ValueError(""), "ValueError"),
    (RuntimeError("   \n "), "RuntimeError"),
    (KeyError("k"), "'k'"),
])
def test_first_line(exc, expected):
    assert first_line(exc) == expected


def test_first_line_of_an_empty_message_can_be_empty_on_request():
    assert first_line(OSError(), empty="") == ""


def test_a_foreign_error_with_an_empty_message_still_becomes_one_line(monkeypatch, tmp_path):
    """loading.load_weights used to index splitlines()[0] of an empty message."""
    import safetensors.torch

    from nsn_cli.project.loading import load_weights

    def fail(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(safetensors.torch, "load_model", fail)
    with pytest.raises(ProjectError, match="does not match the manifest: RuntimeError"):
        load_weights(torch.nn.Linear(1, 1), tmp_path / "model.safetensors")
