"""The memory hints: they never change data, and a released mapped weight leaves RSS."""

import platform
import re
import sys

import pytest
import torch
from safetensors.torch import safe_open, save_file

from nsn_cli.nested.memory import release_pages, trim_heap


def rss_file_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


def test_release_keeps_the_data_of_an_ordinary_tensor():
    weight = torch.randn(512, 1024)
    before = weight.clone()
    release_pages(weight)
    release_pages(weight.T)  # a transposed view covers the same bytes
    trim_heap()
    assert torch.equal(weight, before)


def test_release_of_empty_or_tiny_tensors_is_a_no_op():
    assert release_pages(torch.empty(0)) is False
    assert release_pages(torch.ones(3)) is False  # no whole page under it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile is Linux's")
def test_release_drops_a_memory_mapped_weight_from_the_resident_set(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(4096, 4096)}, str(path))  # 64 MiB
    with safe_open(str(path), framework="pt") as f:
        weight = f.get_tensor("w")
    total = float(weight.sum())  # touch every page: it is resident now
    resident = rss_file_kib()
    kernel = tuple(int(p) for p in re.findall(r"\d+", platform.release())[:2])
    if kernel < (5, 4):
        pytest.skip("MADV_PAGEOUT needs Linux 5.4")
    assert release_pages(weight)
    dropped = resident - rss_file_kib()
    assert dropped > 48 * 1024, f"only {dropped} KiB left the resident set"
    assert float(weight.sum()) == total  # faulted back in from the file, unchanged
