"""Signals to a process and everything it started, as one node going down would see them.

torchrun starts each worker in a session of its own (`start_new_session=True` in
torch.distributed.elastic), so a signal to the launcher's process group reaches the
launcher alone: a SIGKILLed launcher leaves its workers running, still writing. These
helpers find the workers through /proc (Linux) and signal each process by pid.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

GONE = {"Z", "X"}  # zombie or dead: it can no longer touch a file
STOPPED = {"T", "t"}


def fields(pid: int, task: int | None = None) -> list[str] | None:
    """/proc/PID/stat after the command name (state, ppid, …), None once it is gone."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    try:
        return Path(path).read_text().rpartition(")")[2].split()  # the name may hold spaces
    except OSError:
        return None


def started(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot): tells a reused pid from the original."""
    found = fields(pid)
    return found[19] if found else None


class Tree:
    """A process and its descendants as they were at one moment, each known by its pid
    and start time, so that a pid the kernel has given to someone else since is never
    signalled."""

    def __init__(self, root: int):
        children: dict[str, list[int]] = {}
        for entry in os.listdir("/proc"):
            found = fields(int(entry)) if entry.isdigit() else None
            if found:
                children.setdefault(found[1], []).append(int(entry))
        pids, todo = [], [root]
        while todo:  # parents before children
            pids.append(todo.pop(0))
            todo += children.get(str(pids[-1]), [])
        self.members = [(pid, started(pid)) for pid in pids]

    def __len__(self) -> int:
        return len(self.members)

    def live(self) -> list[int]:
        return [pid for pid, start in self.members if start is not None and
                started(pid) == start]

    def freeze(self) -> None:
        """SIGSTOP them all, launcher first (so it cannot react to a stopped worker), and
        return once none of them runs."""
        pids = self.live()
        signal_all(pids, signal.SIGSTOP)
        wait_until(pids, STOPPED)

    def thaw(self) -> None:
        signal_all(self.live()[::-1], signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL them all at once; return when none is left holding files or locks."""
        pids = self.live()
        signal_all(pids, signal.SIGKILL)
        wait_until(pids, GONE)


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def states(pid: int) -> set[str]:
    """The state of each thread of `pid` ({'X'} once it is gone): a group stop reaches
    the threads one by one."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {"X"}
    found = {f[0] for f in (fields(pid, int(task)) for task in tasks) if f}
    return found or {"X"}


def wait_until(pids: list[int], wanted: set[str], timeout: float = 60) -> None:
    """Until every thread of `pids` is in one of the `wanted` states (or gone): kill()
    returns before the target has stopped or died, and a process still running on
    another core could finish a rename after we looked."""
    deadline = time.time() + timeout
    while any(not states(pid) <= wanted | GONE for pid in pids):
        assert time.time() < deadline, f"processes {pids} did not reach {wanted}"
        time.sleep(0.0002)
