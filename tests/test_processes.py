"""tests/processes.py: the SIGKILL harness's reach, checked on a launcher-like process
whose child is in a session of its own (as torchrun starts its workers)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import processes

LAUNCHER = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
            " start_new_session=True)\n"
            "time.sleep(120)\n")


def sleeping(tree: processes.Tree) -> bool:
    try:
        return len(tree) == 2 and b"sleep(120)" in Path(
            f"/proc/{tree.live()[1]}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_tree_stops_and_kills_children_that_left_the_process_group():
    parent = subprocess.Popen([sys.executable, "-c", LAUNCHER])
    try:
        deadline = time.time() + 60
        # Until the child runs its own program: stopped between fork and exec, it would
        # keep the parent (waiting in vfork) from ever stopping.
        while not sleeping(tree := processes.Tree(parent.pid)):
            assert time.time() < deadline, "the child never started"
            time.sleep(0.01)
        child = tree.live()[1]
        tree.freeze()
        assert processes.states(parent.pid) <= processes.STOPPED
        assert processes.states(child) <= processes.STOPPED
        tree.thaw()
        processes.wait_until([parent.pid, child], {"S", "R"})
        tree.kill()
        assert processes.states(child) <= processes.GONE
        assert parent.wait() == -9
    finally:
        if parent.poll() is None:  # a failed check leaves no sleeper behind
            processes.Tree(parent.pid).kill()
            parent.wait()
