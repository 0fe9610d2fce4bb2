"""Token accounting of the load tests: stream events, TTFT/ITL/TPOT/e2e and tokens from usage, hand-computed."""

from __future__ import annotations

import json

import pytest

from loadtests.accounting import RequestRecord, StreamRecorder, finish_json, tokens_in_window


def sse(data: dict[str, object] | str) -> bytes:
    return b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode() + b"\n"


def chat(content: str | None, **extra: object) -> bytes:
    delta = {} if content is None else {"content": content}
    return sse({"choices": [{"index": 0, "delta": delta, **extra}]})


def record(stream: bool = True, **fields: object) -> RequestRecord:
    return RequestRecord(id=1, scenario="chat", stream=stream, start=100.0, max_tokens=16, **fields)  # type: ignore[arg-type]


def feed(lines: list[tuple[float, bytes]], end: float) -> RequestRecord:
    recorder = StreamRecorder(record(status=200))
    for at, line in lines:
        recorder.feed(line, at)
        recorder.feed(b"\n", at)  # the blank line that ends each SSE event
    return recorder.finish(end)


# A stream as vLLM sends it: an empty role chunk, three text events (the last one holding two tokens), an empty
# finish chunk, the usage chunk and [DONE]. The usage says 5 output tokens although only 3 events carried text.
STREAM = [
    (0.10, sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})),
    (0.25, chat("Hel")),
    (0.30, chat("lo")),
    (0.45, chat(" big world")),
    (0.46, chat("", finish_reason="length")),
    (0.47, sse({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}})),
    (0.48, sse("[DONE]")),
]


def test_stream_timings_and_tokens_from_usage_not_chunks() -> None:
    r = feed(STREAM, end=0.50)
    assert r.ok and r.error is None
    assert r.ttft == 0.25  # the empty role chunk is not the first token
    assert r.chunk_times == [0.25, 0.30, 0.45]
    assert r.itls == pytest.approx([0.05, 0.15])
    assert r.e2e == 0.50
    assert (r.prompt_tokens, r.completion_tokens) == (12, 5)
    # TPOT = (e2e - TTFT) / (tokens - 1) = (0.50 - 0.25) / 4
    assert r.tpot == pytest.approx(0.0625)


def test_completion_text_events_count_as_content() -> None:
    lines = [
        (0.2, sse({"choices": [{"index": 0, "text": " a"}]})),
        (0.3, sse({"choices": [{"index": 0, "text": " b"}]})),
        (0.4, sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})),
        (0.4, sse("[DONE]")),
    ]
    r = feed(lines, end=0.4)
    assert r.ok and r.ttft == 0.2 and r.completion_tokens == 2
    assert r.tpot == pytest.approx(0.2)


def tool_call(arguments: str, name: str | None = None) -> bytes:
    function: dict[str, object] = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    call = {"index": 0, "id": "call_1", "type": "function", "function": function}
    return sse({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})


USAGE_AND_DONE = [
    (0.9, sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}})),
    (0.9, sse("[DONE]")),
]


def test_a_tool_call_delta_is_the_first_token() -> None:
    # A function call streams no content at all: its first delta is the first output, as in the gateway's metrics.
    lines = [
        (0.1, sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]})),
        (0.3, tool_call("", name="get_weather")),
        (0.5, tool_call('{"city": ')),
        (0.7, tool_call('"Paris"}')),
        *USAGE_AND_DONE,
    ]
    r = feed(lines, end=1.0)
    assert r.ok, r.error
    assert r.ttft == 0.3
    assert r.chunk_times == [0.3, 0.5, 0.7]


def test_reasoning_before_content_is_the_first_token() -> None:
    lines = [
        (0.2, sse({"choices": [{"index": 0, "delta": {"reasoning_content": "Let me think"}}]})),
        (0.6, chat("Paris")),
        *USAGE_AND_DONE,
    ]
    r = feed(lines, end=1.0)
    assert r.ok and r.ttft == 0.2 and r.chunk_times == [0.2, 0.6]


def test_framing_crlf_split_events_and_a_last_event_without_its_blank_line() -> None:
    recorder = StreamRecorder(record(status=200))
    # CRLF line ends, one event split across reads, and [DONE] without the blank line that should end it.
    recorder.feed(b'data: {"choices":[{"index":0,"delta":{"content":"He', 0.2)
    recorder.feed(b'y"}}]}\r\n\r\n', 0.25)
    recorder.feed(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\r\n\r\n', 0.3)
    recorder.feed(b"data: [DONE]", 0.3)
    r = recorder.finish(0.35)
    assert r.ok, r.error
    assert r.ttft == 0.25  # the event is complete only when its blank line arrives
    assert (r.prompt_tokens, r.completion_tokens) == (3, 1)


def test_output_events_are_counted_live() -> None:
    seen: list[int] = []
    recorder = StreamRecorder(record(status=200), on_output=lambda: seen.append(1))
    for at, line in STREAM:
        recorder.feed(line + b"\n", at)
    assert len(seen) == 3  # the three events with text, not the role, finish or usage events


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (STREAM[:-2] + STREAM[-1:], "no usage"),
        (STREAM[:-1], "without [DONE]"),
        (STREAM[:2] + [(0.3, sse({"error": {"message": "engine died"}}))], "engine died"),
        (STREAM[:2] + [(0.3, b"data: {not json\n")], "unparsable"),
    ],
)
def test_broken_streams_are_errors(lines: list[tuple[float, bytes]], message: str) -> None:
    r = feed(lines, end=0.5)
    assert not r.ok
    assert r.error is not None and message in r.error


def test_non_streamed_answer_takes_usage_and_has_no_ttft() -> None:
    body = {"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 7, "completion_tokens": 9}}
    r = finish_json(record(stream=False, status=200), json.dumps(body).encode(), 1.5)
    assert r.ok and r.ttft is None and r.tpot is None
    assert (r.prompt_tokens, r.completion_tokens, r.e2e) == (7, 9, 1.5)
    bad = finish_json(record(stream=False, status=200), b'{"choices": []}', 1.0)
    assert not bad.ok and bad.error == "no usage in the answer"


def test_tokens_inside_a_window_are_spread_over_content_events() -> None:
    r = record(status=200, ttft=1.0, e2e=4.5, chunk_times=[1.0, 2.0, 3.0, 4.0], prompt_tokens=10, completion_tokens=8)
    # Events at 101, 102, 103, 104; the window [101.5, 103.5) holds two of them: 2 x 8/4 output tokens. The prompt
    # counts when the first token arrives (101), outside the window.
    assert tokens_in_window(r, 101.5, 103.5) == (4.0, 0.0)
    assert tokens_in_window(r, 100.0, 110.0) == (8.0, 10.0)
    failed = record(status=500, error="HTTP 500", e2e=1.0)
    assert tokens_in_window(failed, 0, 1e12) == (0.0, 0.0)


def test_non_streamed_tokens_are_spread_over_the_request() -> None:
    r = record(stream=False, status=200, e2e=4.0, prompt_tokens=10, completion_tokens=8)
    assert tokens_in_window(r, 101.0, 103.0) == (4.0, 5.0)  # half of [100, 104]


def test_record_json_round_trip_and_lateness() -> None:
    r = record(status=200, scheduled=99.5, ttft=0.1, e2e=0.2, chunk_times=[0.1, 0.1234567891], completion_tokens=2)
    back = RequestRecord.from_json(r.to_json())
    assert back.chunk_times == [0.1, 0.123457]
    assert back.late == pytest.approx(0.5)
    assert back.end == pytest.approx(100.2)
    assert RequestRecord.from_json({"type": "request", **json.loads(r.to_json())}).id == 1
