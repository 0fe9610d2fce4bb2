"""Per-request token accounting: timings (TTFT, ITL, TPOT, e2e) from the stream, token counts from usage."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from serve.protocol.stream import (
    EventSplitter,
    EventTooLarge,
    Kind,
    classify,
    data_of,
    error_message,
    payload,
    usage_of,
    usage_tokens,
)


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds; `start` and `scheduled` are Unix times."""

    id: int
    scenario: str
    stream: bool
    start: float
    max_tokens: int
    # Open loop: when the request should have been sent (`start` minus this is how late it went out).
    scheduled: float | None = None
    status: int = 0
    error: str | None = None
    cancelled: bool = False
    ttft: float | None = None
    e2e: float | None = None
    # Arrival of every event that carried generated output, in seconds after `start`.
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and not self.cancelled and self.completion_tokens is not None

    @property
    def late(self) -> float:
        return max(0.0, self.start - self.scheduled) if self.scheduled is not None else 0.0

    @property
    def end(self) -> float | None:
        return None if self.e2e is None else self.start + self.e2e

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive output events (a gap can hold more than one token; TPOT uses usage)."""
        times = self.chunk_times
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - TTFT) / (tokens - 1), tokens from the server's usage."""
        if self.ttft is None or self.e2e is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)

    def to_json(self) -> str:
        data = asdict(self)
        data["chunk_times"] = [round(t, 6) for t in self.chunk_times]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str | dict[str, Any]) -> RequestRecord:
        data = json.loads(line) if isinstance(line, str) else dict(line)
        data.pop("type", None)
        return cls(**data)


class StreamRecorder:
    """Feeds the bytes of an SSE stream (with their arrival time in seconds after send) into a RequestRecord.

    Framing and the meaning of each event come from serve.protocol.stream, as in the gateway, so TTFT here is the
    gateway's TTFT: the first event that carries generated output of any kind (content, reasoning, a tool-call
    delta, completion text). Output events are judged on their bytes; the others are parsed, so a stream that is
    not JSON is an error rather than silence.
    """

    def __init__(self, record: RequestRecord, on_output: Callable[[], None] | None = None) -> None:
        self.record = record
        self.done = False
        self.splitter = EventSplitter()
        self.on_output = on_output

    def feed(self, data: bytes, at: float) -> None:
        try:
            events = self.splitter.feed(data)
        except EventTooLarge as exc:
            self.fail(str(exc))
            return
        for event in events:
            self.event(event, at)

    def event(self, event: bytes, at: float) -> None:
        kind = classify(event)
        if kind is Kind.OUTPUT:
            if self.record.ttft is None:
                self.record.ttft = at
            self.record.chunk_times.append(at)
            if self.on_output is not None:
                self.on_output()
            # With continuous usage stats an output event also carries the running total.
            if b'"usage":{' in event or b'"usage": {' in event:
                self.usage((data_of(event) or {}).get("usage"))
        elif kind is Kind.USAGE:
            self.usage(usage_of(event))
        elif kind is Kind.DONE:
            self.done = True
        elif kind is Kind.ERROR:
            self.fail(f"error event: {error_message(data_of(event) or {})}")
        elif payload(event).strip() and data_of(event) is None:
            self.fail(f"unparsable event: {payload(event)[:80].decode('utf-8', errors='replace')}")

    def usage(self, usage: object) -> None:
        prompt, completion = usage_tokens(usage)
        if completion is not None:
            # The last usage wins: with continuous usage stats every event carries a running total.
            self.record.prompt_tokens, self.record.completion_tokens = prompt, completion

    def fail(self, message: str) -> None:
        if self.record.error is None:
            self.record.error = message

    def finish(self, at: float) -> RequestRecord:
        last = self.splitter.flush()
        if last is not None:
            self.event(last, at)
        record = self.record
        record.e2e = at
        if record.error is None and not record.cancelled:
            if not self.done:
                record.error = "stream ended without [DONE]"
            elif record.completion_tokens is None:
                record.error = "no usage in the stream (stream_options.include_usage ignored?)"
        return record


def finish_json(record: RequestRecord, body: bytes, at: float) -> RequestRecord:
    """A non-streamed answer: e2e is the whole exchange; there is no TTFT to observe."""
    record.e2e = at
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        record.error = "unparsable JSON answer"
        return record
    if not isinstance(data, dict):
        record.error = "unexpected JSON answer"
        return record
    if "error" in data:
        record.error = error_message(data)
        return record
    record.prompt_tokens, record.completion_tokens = usage_tokens(data.get("usage"))
    if record.completion_tokens is None:
        record.error = "no usage in the answer"
    return record


def tokens_in_window(record: RequestRecord, t0: float, t1: float) -> tuple[float, float]:
    """(output, prompt) tokens of a finished request that the server produced inside [t0, t1).

    A streamed request's usage is spread evenly over its content events and its prompt counts when the first one
    arrives (prefill is done by then); a non-streamed one's tokens are spread evenly over its whole duration.
    """
    if not record.ok or record.e2e is None:
        return 0.0, 0.0
    output = float(record.completion_tokens or 0)
    prompt = float(record.prompt_tokens or 0)
    if record.stream and record.chunk_times:
        times = [record.start + t for t in record.chunk_times]
        share = output / len(times)
        out = share * sum(1 for t in times if t0 <= t < t1)
        first = times[0]
        return out, prompt if t0 <= first < t1 else 0.0
    start, end = record.start, record.start + record.e2e
    if end <= start:
        inside = 1.0 if t0 <= start < t1 else 0.0
    else:
        inside = max(0.0, min(end, t1) - max(start, t0)) / (end - start)
    return output * inside, prompt * inside
