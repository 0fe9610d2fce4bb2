"""The gateway's CPUs beside local CPU engines: off the cores an engine's threads are bound to (a fake /proc)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.engine.placement import format_cpus, gateway_cpus, parse_cpu_list, process_tree


def fake_process(proc: Path, pid: int, ppid: int, threads: dict[int, str], name: str = "python") -> None:
    folder = proc / str(pid)
    folder.mkdir(parents=True)
    (folder / "stat").write_text(f"{pid} ({name}) S {ppid} {pid} {pid} 0 -1\n")
    for tid, cpus in threads.items():
        (folder / "task" / str(tid)).mkdir(parents=True)
        (folder / "task" / str(tid) / "status").write_text(f"Name:\t{name}\nCpus_allowed_list:\t{cpus}\nVm:\t1\n")


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """vLLM on 2 cores: the API server (100) and its engine core (101) unbound but for the model's thread (102,
    bound to core 0); an unrelated process (200) bound to core 1."""
    root = tmp_path / "proc"
    fake_process(root, 1, 0, {1: "0-1"}, name="init")
    fake_process(root, 100, 1, {100: "0-1", 105: "0-1"})
    fake_process(root, 101, 100, {101: "0-1", 102: "0"}, name="VLLM::Engine Core (x)")
    fake_process(root, 200, 1, {200: "1"})
    (root / "self").mkdir()  # not a process: skipped
    return root


def test_cpu_lists_as_the_kernel_writes_them() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("5") == {5}
    assert format_cpus({1}) == "CPU 1"
    assert format_cpus({3, 1}) == "CPUs 1,3"
    assert format_cpus({0, 2, 3, 4, 7, 8, 10, 11, 12, 13}) == "CPUs 0,2-4,7,8,10-13"
    many = set(range(1, 128))
    assert format_cpus(many) == "CPUs 1-127"
    assert parse_cpu_list(format_cpus(many).removeprefix("CPUs ")) == many


def test_a_process_tree_holds_the_children_of_children(proc: Path) -> None:
    assert process_tree([100], proc) == {100, 101}


def test_the_gateway_goes_on_the_cores_no_engine_thread_is_bound_to(proc: Path) -> None:
    # Process 200, bound to core 1 but outside the engine's tree, does not count (else no core would be left).
    assert gateway_cpus([100], proc, available={0, 1}) == {1}


def test_the_gateway_is_left_unpinned_without_a_binding_or_a_free_core(tmp_path: Path, proc: Path) -> None:
    unbound = tmp_path / "unbound"
    fake_process(unbound, 100, 1, {100: "0-1", 101: "0-1"})
    assert gateway_cpus([100], unbound, available={0, 1}) is None
    every = tmp_path / "every"
    fake_process(every, 100, 1, {100: "0-1", 101: "0", 102: "1"})
    assert gateway_cpus([100], every, available={0, 1}) is None
    # An engine that is gone leaves nothing to read.
    assert gateway_cpus([999], proc, available={0, 1}) is None
