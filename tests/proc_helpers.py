"""Finding and killing the processes of one Ray node or cluster in tests, by reading ``/proc`` (Linux): the tests
that start Ray nodes end exactly those (`ray stop` would stop every Ray on the machine, other test runs' too)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children...)."""
    parent = {p: _ppid(p) for p in _pids()}
    found, todo = [], [pid]
    while todo:
        kids = [p for p, pp in parent.items() if pp == todo[-1]]
        todo.pop()
        found += kids
        todo += kids
    return found


def _each(name: str) -> list[tuple[int, bytes]]:
    """``/proc/PID/<name>`` of every process but this one that can be read."""
    out = []
    for p in _pids():
        if p == os.getpid():
            continue
        try:
            out.append((p, Path(f"/proc/{p}/{name}").read_bytes()))
        except OSError:
            continue
    return out


def naming(text: str) -> list[int]:
    """The processes whose command line contains ``text`` (e.g. a Ray temp dir)."""
    # arguments are NUL-terminated: read as "arg1 arg2 ... " (each followed by a space)
    return [p for p, raw in _each("cmdline") if text in raw.replace(b"\0", b" ").decode(errors="replace")]


def with_env(name: str, value: str) -> list[int]:
    """The processes started with ``name=value`` in their environment. Ray's workers inherit the driver's
    environment but rename themselves (``ray::IDLE``, ``ray::ImplicitFunc.train``), so their command line does not
    name the driver's Ray temp dir; killed with their driver they would go on training and writing results."""
    entry = b"\0" + f"{name}={value}".encode() + b"\0"
    return [p for p, raw in _each("environ") if entry in b"\0" + raw]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill(pids: list[int], timeout_s: float = 10) -> None:
    """SIGKILL each of ``pids`` and wait (up to ``timeout_s``) until they are gone."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def end_command(pid: int, ray_tmp: str) -> None:
    """End what is left of a command started in its own session (``start_new_session=True``) and of the Ray it
    started: its process group, every process naming its Ray temp dir ``ray_tmp``, and every process started with
    ``RAY_TMPDIR=ray_tmp`` (the command's own environment: Ray's workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    kill(naming(ray_tmp) + with_env("RAY_TMPDIR", ray_tmp))
