"""The gateway benchmark's load side: wrk runs driven by a Lua POST script, and the CPU each process used per phase."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def lua_script(folder: Path, body: bytes, key: str, name: str) -> Path:
    """wrk's POST script; `done` prints the numbers as one JSON line (microseconds)."""
    path = folder / f"{name}.lua"
    path.write_text(
        f"""wrk.method = "POST"
wrk.body = [==[{body.decode()}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"latency_us":{{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""
    )
    path.chmod(0o600)
    return path


def run_wrk(url: str, script: Path, connections: int, seconds: int, cpu: int) -> dict[str, Any]:
    argv = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
    done = subprocess.run(
        [*argv, "-s", str(script), url + "/v1/chat/completions"], capture_output=True, text=True, timeout=seconds + 60
    )
    for line in done.stdout.splitlines():
        if line.startswith("WRK "):
            result: dict[str, Any] = json.loads(line[4:])
            return result
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}): {done.stderr.strip() or done.stdout[-500:]}")


def _tree_cpu(proc: Any) -> float:
    """CPU seconds of a process and its live children (a gateway may run worker processes)."""
    import psutil

    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


class Usage:
    """CPU seconds of our processes, of waited-for children (wrk) and of each core, between two moments."""

    def __init__(self, pids: dict[str, int]) -> None:
        import psutil

        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.start = self._take()

    def _take(self) -> dict[str, Any]:
        import psutil

        own = {name: _tree_cpu(p) for name, p in self.procs.items()}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        cores = [t.user + t.nice + t.system + t.irq + t.softirq + t.steal for t in psutil.cpu_times(percpu=True)]
        return {
            "t": time.perf_counter(),
            "own": own,
            "wrk": children.ru_utime + children.ru_stime,
            "bench": me.ru_utime + me.ru_stime,
            "cores": cores,
        }

    def since(self) -> dict[str, Any]:
        end, start = self._take(), self.start
        wall = end["t"] - start["t"]
        # A child that exited between the two moments takes its seconds with it: never below zero.
        share = {name: max(0.0, end["own"][name] - start["own"][name]) / wall for name in end["own"]}
        share["wrk"] = (end["wrk"] - start["wrk"]) / wall
        share["bench"] = (end["bench"] - start["bench"]) / wall
        cores = [(b - a) / wall for a, b in zip(start["cores"], end["cores"], strict=True)]
        return {"processes": share, "cores": cores, "wall_s": wall}


def py_spy() -> str | None:
    """py-spy from PATH or from the venv this runs in (a venv's scripts need not be on PATH)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.is_file() else None)


def profile_wrk(
    pid: int, out: Path, url: str, script: Path, connections: int, seconds: int, cpu: int
) -> dict[str, Any]:
    """A wrk run with py-spy sampling the process meanwhile; py-spy runs on the load core.

    The stacks are written in the collapsed format (flamegraph tools and speedscope read it), aggregated by
    function, only samples of the thread holding the GIL (threads blocked in a pool, or the loop in epoll, are not
    work), so the profile shows where the process spends its CPU. py-spy pauses the
    process for each sample (without the pause, stacks come out torn), which is why profiled phases are not measured.
    """
    argv = ["taskset", "-c", str(cpu), py_spy() or "py-spy", "record", "--pid", str(pid), "--duration", str(seconds)]
    argv += ["--rate", "100", "--function", "--gil", "--format", "raw", "--output", str(out)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        result = run_wrk(url, script, connections, seconds, cpu)
        _, err = spy.communicate(timeout=seconds + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed (exit {spy.returncode}): {err.decode(errors='replace').strip()[-1000:]}")
    return result


def top_frames(collapsed: str, limit: int) -> dict[str, Any]:
    """The functions with the most samples: on the stack at all (total) and running themselves (self)."""
    total: dict[str, int] = {}
    own: dict[str, int] = {}
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count

    def top(counts: dict[str, int]) -> list[tuple[str, int]]:
        return sorted(counts.items(), key=lambda item: -item[1])[:limit]

    return {
        "samples": samples,
        "total": [[frame, n / samples] for frame, n in top(total)],
        "self": [[frame, n / samples, total[frame] / samples] for frame, n in top(own)],
    }
