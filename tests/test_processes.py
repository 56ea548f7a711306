"""tests/processes.py: the SIGKILL harness's reach, checked on a launcher-like process
whose child is in a session of its own (as torchrun starts its workers)."""

import subprocess
import sys
import time

import pytest

from tests import processes

LAUNCHER = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
            " start_new_session=True)\n"
            "time.sleep(120)\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_tree_stops_and_kills_children_that_left_the_process_group():
    parent = subprocess.Popen([sys.executable, "-c", LAUNCHER])
    try:
        deadline = time.time() + 60
        while len(tree := processes.Tree(parent.pid)) < 2:
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
