"""Side-by-side output tokens/s of N concurrent streamed requests: straight to an engine vs through the gateway.

Rounds alternate between the two targets in one run so that both see the same machine noise. Output tokens are
taken from the server's usage (`stream_options.include_usage`), never from chunk counts.

    python -m loadtests.stream_compare --gateway http://127.0.0.1:8000 --gateway-key "$(cat .llmserve/dev-key)" \
        --engine http://127.0.0.1:PORT --engine-key KEY --model smollm2-135m-instruct --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import httpx


@dataclass
class Target:
    name: str
    url: str
    key: str


@dataclass
class Round:
    target: str
    output_tokens: int
    seconds: float
    ttfts: list[float]

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds


async def one_stream(
    client: httpx.AsyncClient, target: Target, model: str, max_tokens: int, i: int
) -> tuple[int, float]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Request {i}: write a short story about a lighthouse keeper."}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = float("nan")
    tokens = 0
    headers = {"authorization": f"Bearer {target.key}"}
    async with client.stream("POST", f"{target.url}/v1/chat/completions", json=body, headers=headers) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if ttft != ttft and any((c.get("delta") or {}).get("content") for c in data.get("choices") or ()):
                ttft = time.perf_counter() - start
            if data.get("usage") and not data.get("choices"):
                tokens = int(data["usage"]["completion_tokens"])
    return tokens, ttft


async def run_round(target: Target, model: str, concurrency: int, max_tokens: int) -> Round:
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, target, model, max_tokens, i) for i in range(concurrency)))
        seconds = time.perf_counter() - start
    return Round(target.name, sum(t for t, _ in results), seconds, [f for _, f in results])


async def compare(targets: list[Target], model: str, concurrency: int, max_tokens: int, rounds: int) -> list[Round]:
    for target in targets:  # warm-up, not counted
        await run_round(target, model, min(concurrency, 4), 8)
    out: list[Round] = []
    for _ in range(rounds):
        for target in targets:
            out.append(await run_round(target, model, concurrency, max_tokens))
    return out


def summarize(rounds: list[Round], names: list[str]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        mine = [r for r in rounds if r.target == name]
        ttfts = sorted(f for r in mine for f in r.ttfts)
        summary[name] = {
            "output_tok_per_s": statistics.median(r.tok_per_s for r in mine),
            "ttft_p50_s": ttfts[len(ttfts) // 2],
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))],
            "output_tokens": sum(r.output_tokens for r in mine),
        }
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway", required=True)
    p.add_argument("--gateway-key", required=True)
    p.add_argument("--engine", required=True)
    p.add_argument("--engine-key", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    targets = [
        Target("engine", args.engine, args.engine_key),
        Target("gateway", args.gateway, args.gateway_key),
    ]
    rounds = asyncio.run(compare(targets, args.model, args.concurrency, args.max_tokens, args.rounds))
    summary = summarize(rounds, [t.name for t in targets])
    ratio = summary["gateway"]["output_tok_per_s"] / summary["engine"]["output_tok_per_s"]
    print(
        json.dumps(
            {
                "concurrency": args.concurrency,
                "max_tokens": args.max_tokens,
                "rounds": args.rounds,
                "per_round": [(r.target, round(r.tok_per_s, 1)) for r in rounds],
                "summary": summary,
                "gateway_over_engine": round(ratio, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
