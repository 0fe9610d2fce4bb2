"""The streaming client used by Locust users: one OpenAI-style request on a FastHttpSession, timed token by token."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from loadtests.accounting import RequestRecord, StreamRecorder, finish_json
from loadtests.scenarios import RequestSpec

# (request_type, name, response_time_ms, failure message or None): Locust's request event, bound by the caller.
Fire = Callable[[str, str, float, str | None], None]


def _no_fire(kind: str, name: str, ms: float, failure: str | None) -> None:
    return None


def read_lines(response: Any, recorder: StreamRecorder, sent: float, clock: Callable[[], float]) -> None:
    """Timestamp each SSE line when it arrives.

    geventhttpclient's `read(n)` (behind Locust's `iter_content`) waits until n bytes are buffered, which would bunch
    tokens together and fake the inter-token latency; `readline` returns as soon as one line is complete.
    """
    raw = response._response
    while True:
        line = raw.readline(b"\n")
        if not line:
            return
        recorder.feed(line, clock() - sent)
        if recorder.done:
            # Drain to the end of the message so the connection goes back to the pool clean.
            while raw.readline(b"\n"):
                pass
            return


def send(
    session: Any,
    spec: RequestSpec,
    key: str | None,
    record_id: int,
    *,
    scheduled: float | None = None,
    extra: dict[str, Any] | None = None,
    fire: Fire = _no_fire,
    done: Callable[[RequestRecord], None] | None = None,
    on_output: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> RequestRecord:
    """Send one request and return its record; a greenlet killed meanwhile leaves a `cancelled` record behind.

    `on_output` is called at every output event as it arrives (the live progress line counts them).
    """
    body = {**spec.body, **(extra or {})}
    headers = {"Accept-Encoding": "identity"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if spec.stream:
        headers["Accept"] = "text/event-stream"
    record = RequestRecord(
        id=record_id,
        scenario=spec.scenario,
        stream=spec.stream,
        start=time.time(),
        max_tokens=spec.max_tokens,
        scheduled=scheduled,
    )
    sent = clock()
    response = None
    try:
        # Locust's own entry for this request times the response headers only (stream=True); the real
        # latencies are the TTFT/TPOT/ITL/E2E entries fired below.
        name = f"{spec.scenario} (headers)" if spec.stream else f"{spec.scenario} (whole answer)"
        response = session.request("POST", spec.path, json=body, headers=headers, stream=spec.stream, name=name)
        record.status = response.status_code
        if record.status != 200:
            text = (response.text or "") if record.status else str(getattr(response, "error", "no response"))
            record.error = f"HTTP {record.status}: {text[:200]}"
            record.e2e = clock() - sent
        elif spec.stream:
            recorder = StreamRecorder(record, on_output)
            read_lines(response, recorder, sent, clock)
            recorder.finish(clock() - sent)
        else:
            finish_json(record, response.content or b"", clock() - sent)
    except Exception as exc:  # connection reset mid-stream, timeouts: the request failed, the user goes on
        record.error = f"{type(exc).__name__}: {exc}"[:300]
        record.e2e = clock() - sent
    except BaseException:
        # GreenletExit: the test is stopping and this request is still running; it is not an error.
        record.cancelled = True
        record.e2e = clock() - sent
        raise
    finally:
        raw = getattr(response, "_response", None)
        if hasattr(raw, "release"):
            # Closes the socket when the answer was not read to the end, so the server aborts generation.
            raw.release()
        report(record, fire)
        if done is not None:
            done(record)
    return record


def report(record: RequestRecord, fire: Fire) -> None:
    """Locust entries of their own: TTFT, TPOT, every ITL gap and the end-to-end time, or one failure."""
    if record.cancelled:
        return
    name = record.scenario
    e2e_ms = (record.e2e or 0.0) * 1000
    if not record.ok:
        fire("E2E", name, e2e_ms, record.error or "failed")
        return
    if record.ttft is not None:
        fire("TTFT", name, record.ttft * 1000, None)
    tpot = record.tpot
    if tpot is not None:
        fire("TPOT", name, tpot * 1000, None)
    for gap in record.itls:
        fire("ITL", name, gap * 1000, None)
    fire("E2E", name, e2e_ms, None)
