"""Where the gateway runs beside local CPU engines: off the cores an engine's OpenMP threads are bound to.

vLLM's CPU backend binds each OpenMP thread of its model to one core and leaves the rest of its processes unbound.
A gateway the kernel puts on such a core waits behind the model's compute: on a 2-core machine, the gateway pinned
to the model's core streamed in bunches with seconds between them. So `up` starts the gateway on the cores no engine
thread is bound to, read from /proc once the engines are ready; when there is none (every core bound, or no binding
found), the gateway is left where the kernel puts it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable
from pathlib import Path

from serve.engine.process import PROC, parent_ids


def parse_cpu_list(text: str) -> set[int]:
    """A kernel CPU list ("0-3,8,10-11") as a set."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def thread_cpus(status: Path) -> set[int] | None:
    """The CPUs a thread may run on (its status file's Cpus_allowed_list); None once it is gone."""
    with contextlib.suppress(OSError, ValueError):
        for line in status.read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return parse_cpu_list(line.split(":", 1)[1])
    return None


def process_tree(roots: Iterable[int], proc: Path = PROC) -> set[int]:
    """The given processes and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, parent in parent_ids(proc).items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def bound_cpus(roots: Iterable[int], available: set[int], proc: Path = PROC) -> set[int]:
    """The CPUs that threads of these process trees are bound to: each thread allowed on fewer than `available`."""
    bound: set[int] = set()
    for pid in process_tree(roots, proc):
        with contextlib.suppress(OSError):
            for task in (proc / str(pid) / "task").iterdir():
                cpus = thread_cpus(task / "status")
                if cpus is not None and cpus < available:
                    bound |= cpus
    return bound


def gateway_cpus(engine_pids: Iterable[int], proc: Path = PROC, available: set[int] | None = None) -> set[int] | None:
    """The CPUs for the gateway: those no engine thread is bound to; None to leave it unpinned."""
    mine = available if available is not None else os.sched_getaffinity(0)
    bound = bound_cpus(engine_pids, mine, proc)
    rest = mine - bound
    return rest if bound and rest else None


def format_cpus(cpus: set[int]) -> str:
    """A set of CPUs as the kernel writes a CPU list ("0-3,8"), runs of three or more as ranges, with its noun."""
    parts = []
    # Consecutive CPUs share their difference from their place in the sorted list.
    for _, group in itertools.groupby(enumerate(sorted(cpus)), key=lambda placed: placed[1] - placed[0]):
        run = [cpu for _, cpu in group]
        parts.append(f"{run[0]}-{run[-1]}" if len(run) >= 3 else ",".join(map(str, run)))
    return ("CPU " if len(cpus) == 1 else "CPUs ") + ",".join(parts)
