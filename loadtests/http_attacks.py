"""What hostile clients cost a real `llmserve gateway`: peak memory of huge heads; fds and connections slowloris holds.

Starts an instant upstream and the gateway of a source tree (`--source`, default this checkout) as their own
processes on loopback, then attacks it from this process and reads the gateway's /proc entries:

    python -m loadtests.http_attacks heads                      # one 48 MiB header, then 1.9 MiB of small headers
    python -m loadtests.http_attacks slowloris --per-kind 60 --hold 30
    python -m loadtests.http_attacks --source ../before heads   # the same against another checkout
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from serve.engine.process import free_port

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


@dataclass
class Target:
    pid: int
    port: int
    key: str


def create_key(source: Path, path: Path) -> str:
    """A key made by the attacked checkout's own CLI: the keys file's format may differ between checkouts."""
    out = subprocess.run(
        [sys.executable, "-m", "serve.cli", "keys", "create", "--name", "attacks", "--keys-file", str(path)],
        cwd=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"sk-llms-\S+", out)
    if found is None:
        raise RuntimeError(f"no key in: {out}")
    return found.group(0)


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.1)


@contextmanager
def gateway(source: Path) -> Iterator[Target]:
    """A fresh gateway (so its peak-memory mark starts clean) in front of an instant upstream."""
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        up_port, gw_port = free_port(), free_port()
        key = create_key(source, tmp / "keys.yaml")
        model = {
            "name": "instant",
            "source": "org/instant",
            "engine": {"max_model_len": 4096},
            "policy": {"max_tokens_cap": 1024},
            "endpoints": [f"http://127.0.0.1:{up_port}"],
        }
        (tmp / "instant.yaml").write_text(yaml.safe_dump(model))
        config = {
            "host": "127.0.0.1",
            "port": gw_port,
            "keys_file": str(tmp / "keys.yaml"),
            "log_level": "warning",
            "models": [{"file": str(tmp / "instant.yaml")}],
        }
        (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "LLMSERVE_ENGINE_KEY": "attacks-engine-key"}
        upstream = subprocess.Popen(
            [sys.executable, "-m", "loadtests.instant_upstream", "--port", str(up_port)], cwd=ROOT
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "gateway", "--config", str(tmp / "gateway.yaml")],
            cwd=source,
            env=env,
            # A client that hangs up mid-body makes the gateway of some checkouts log a traceback per connection.
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(f"http://127.0.0.1:{up_port}/health", upstream)
            wait_ready(f"http://127.0.0.1:{gw_port}/readyz", proc)
            # Warm up the paths an attack touches, so the peak mark measures the attack and not first use.
            body = {"model": "instant", "messages": [{"role": "user", "content": "hi"}]}
            for _ in range(20):
                httpx.post(
                    f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                    json=body,
                    headers={"authorization": f"Bearer {key}"},
                )
            yield Target(pid=proc.pid, port=gw_port, key=key)
        finally:
            for p in (proc, upstream):
                p.terminate()
                p.wait(timeout=30)


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def send_head(port: int, head: bytes) -> dict[str, object]:
    """Sends a head; reports how much went out before the gateway refused, and its status line."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(30)
    sent = 0
    view = memoryview(head)
    try:
        while sent < len(head):
            sent += sock.send(view[sent : sent + 256 * 1024])
    except OSError:
        pass
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    sock.close()
    return {"sent_mib": round(sent / MIB, 2), "status": answer.split(b"\r\n", 1)[0].decode(errors="replace")}


def heads(source: Path) -> dict[str, object]:
    one_big = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (48 * MIB) + b"\r\n\r\n"
    lines = [b"x%06d: v\r\n" % i for i in range(1_900_000 // 11)]
    many_small = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(lines) + b"\r\n"
    results: dict[str, object] = {}
    for name, head in (("one 48 MiB header", one_big), ("1.98 MiB of 12-byte headers", many_small)):
        with gateway(source) as target:
            # Forget the peak of startup and warm-up (Linux: writing 5 to clear_refs resets VmHWM to the current RSS).
            Path(f"/proc/{target.pid}/clear_refs").write_text("5")
            before = status_kib(target.pid, "VmHWM")
            outcome = send_head(target.port, head)
            time.sleep(0.5)
            outcome["peak_rss_rise_mib"] = round((status_kib(target.pid, "VmHWM") - before) / 1024, 1)
            outcome["head_mib"] = round(len(head) / MIB, 2)
            results[name] = outcome
    return results


@dataclass
class Held:
    """One attacking connection: whether the gateway closed it, when, and with what answer."""

    sock: socket.socket
    answer: bytes = b""
    closed_after: float | None = None

    def poll(self, elapsed: float) -> None:
        """Reads what the gateway sent without waiting; notes the moment it closed the connection."""
        if self.closed_after is not None:
            return
        self.sock.setblocking(False)
        try:
            while chunk := self.sock.recv(65536):
                self.answer += chunk
        except BlockingIOError:
            return
        except OSError:
            pass
        self.closed_after = elapsed


def slowloris(source: Path, per_kind: int, hold: float) -> dict[str, object]:
    with gateway(source) as target:
        baseline = open_fds(target.pid)
        kinds: dict[str, list[Held]] = {"silent": [], "slow headers": [], "slow bodies": []}
        auth = f"Authorization: Bearer {target.key}\r\n".encode()
        start = time.monotonic()
        for _ in range(per_kind):
            for kind, held in kinds.items():
                sock = socket.create_connection(("127.0.0.1", target.port))
                if kind == "slow headers":
                    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                elif kind == "slow bodies":
                    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    sock.sendall(head + auth + b"Content-Length: 100000\r\n\r\n{")
                held.append(Held(sock))
        peak_fds = open_fds(target.pid)
        while time.monotonic() - start < hold:
            time.sleep(1)
            peak_fds = max(peak_fds, open_fds(target.pid))
            elapsed = time.monotonic() - start
            for kind, held in kinds.items():
                for conn in held:
                    conn.poll(elapsed)
                    # One more line or byte a second on each connection still open: never idle, never done.
                    if conn.closed_after is None and kind != "silent":
                        with suppress(OSError):
                            conn.sock.send(b"x-drip: 1\r\n" if kind == "slow headers" else b" ")
        fds_at_end = open_fds(target.pid)
        report: dict[str, object] = {}
        for kind, held in kinds.items():
            closed = [c.closed_after for c in held if c.closed_after is not None]
            report[kind] = {
                "still_held": len(held) - len(closed),
                "closed_after_s": [round(min(closed), 1), round(max(closed), 1)] if closed else None,
                "answers": sorted({c.answer.split(b"\r\n", 1)[0].decode(errors="replace") for c in held}),
            }
            for conn in held:
                conn.sock.close()
        time.sleep(3)
        return {
            "connections": per_kind * len(kinds),
            "hold_s": hold,
            "fds_baseline": baseline,
            "fds_peak": peak_fds,
            "fds_at_end": fds_at_end,
            "fds_3s_after_the_clients_left": open_fds(target.pid),
            "still_held_total": sum(len(h) - sum(c.closed_after is not None for c in h) for h in kinds.values()),
            "by_kind": report,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT, help="checkout whose gateway is attacked")
    sub = parser.add_subparsers(dest="attack", required=True)
    sub.add_parser("heads", help="peak RSS of one huge header and of many small ones")
    slow = sub.add_parser("slowloris", help="silent, slow-header and slow-body connections held open")
    slow.add_argument("--per-kind", type=int, default=60)
    slow.add_argument("--hold", type=float, default=30.0)
    args = parser.parse_args()
    source = args.source.resolve()
    result = heads(source) if args.attack == "heads" else slowloris(source, args.per_kind, args.hold)
    print(json.dumps({"source": str(source), args.attack: result}, indent=2))


if __name__ == "__main__":
    main()
