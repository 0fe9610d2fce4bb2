"""The OpenAI stream module: framing in every split and line-end style, what each event carries, usage."""

from __future__ import annotations

import json
import time

import pytest

from serve.protocol.stream import (
    DONE,
    EventSplitter,
    EventTooLarge,
    Kind,
    classify,
    encode,
    output_text,
    usage_of,
    usage_tokens,
)


def chat(delta: dict[str, object], **extra: object) -> bytes:
    return encode({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}], **extra})


USAGE = encode({"id": "x", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        (chat({"role": "assistant", "content": ""}), Kind.OTHER),
        (chat({"content": "Paris"}), Kind.OUTPUT),
        (chat({"reasoning_content": "thinking"}), Kind.OUTPUT),
        (chat({"reasoning": "thinking"}), Kind.OUTPUT),
        (chat({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}]}), Kind.OUTPUT),
        (chat({"content": None}, usage=None), Kind.OTHER),
        (encode({"choices": [{"index": 0, "text": "tok", "logprobs": None}]}), Kind.OUTPUT),
        (encode({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}), Kind.OTHER),
        # Spaces after the colon (json.dumps' default) are recognised too.
        (b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n', Kind.OUTPUT),
        # Text that quotes a key is escaped, so it is not mistaken for one.
        (chat({"content": ""}, note='"content":"x"'), Kind.OTHER),
        (USAGE, Kind.USAGE),
        (DONE, Kind.DONE),
        (encode({"error": {"message": "boom", "type": "x", "param": None, "code": None}}), Kind.ERROR),
        (encode({"object": "error", "message": "boom"}), Kind.ERROR),
        (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Pa"}\n\n',
            Kind.OUTPUT,
        ),
        (
            b'event: response.reasoning_text.delta\ndata: {"type":"response.reasoning_text.delta","delta":"h"}\n\n',
            Kind.OUTPUT,
        ),
        (
            b'event: response.completed\ndata: {"type":"response.completed","response":{"output":[{"content":'
            b'[{"type":"output_text","text":"Paris"}]}],"usage":{"input_tokens":5,"output_tokens":2}}}\n\n',
            Kind.USAGE,
        ),
        (b'event: response.created\ndata: {"type":"response.created","response":{"output":[]}}\n\n', Kind.OTHER),
        (b": keep-alive comment\n\n", Kind.OTHER),
    ],
)
def test_classify(event: bytes, kind: Kind) -> None:
    assert classify(event) is kind


def test_usage_of_both_apis() -> None:
    assert usage_tokens(usage_of(USAGE)) == (7, 3)
    completed = b'data: {"type":"response.completed","response":{"usage":{"input_tokens":5,"output_tokens":2}}}\n\n'
    assert usage_tokens(usage_of(completed)) == (5, 2)
    # Continuous usage stats put usage on content chunks too; only the final one (no choices) counts.
    assert usage_of(chat({"content": "a"}, usage={"prompt_tokens": 1, "completion_tokens": 1})) is None


def test_output_text() -> None:
    assert output_text({"choices": [{"delta": {"content": "a", "reasoning_content": "b"}}]}) == "ab"
    assert output_text({"choices": [{"text": "c"}]}) == "c"
    assert output_text({"type": "response.output_text.delta", "delta": "d"}) == "d"


def split_all(data: bytes, size: int) -> list[bytes]:
    splitter = EventSplitter()
    events: list[bytes] = []
    for i in range(0, len(data), size):
        events += splitter.feed(data[i : i + size])
    last = splitter.flush()
    return events + ([last] if last else [])


STREAM = chat({"content": "a"}) + chat({"content": "b"}) + USAGE + DONE


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
@pytest.mark.parametrize("crlf", [False, True])
def test_splitter_any_chunking(size: int, crlf: bool) -> None:
    data = STREAM.replace(b"\n", b"\r\n") if crlf else STREAM
    assert split_all(data, size) == [chat({"content": "a"}), chat({"content": "b"}), USAGE, DONE]


def test_last_event_without_blank_line() -> None:
    assert split_all(chat({"content": "a"}) + USAGE.rstrip(b"\n"), 5) == [chat({"content": "a"}), USAGE]


def test_one_event_per_chunk_is_not_copied() -> None:
    event = chat({"content": "a"})
    assert EventSplitter().feed(event)[0] is event


def test_bounded_event_size() -> None:
    splitter = EventSplitter(max_event_bytes=1024)
    splitter.feed(b"data: " + b"x" * 1000)
    with pytest.raises(EventTooLarge):
        splitter.feed(b"x" * 100)


def test_large_event_in_small_chunks_is_linear() -> None:
    # 8 MiB in 4 KiB chunks: re-copying the pending bytes per chunk would take minutes, appending takes milliseconds.
    text = "x" * (8 * 1024 * 1024)
    event = encode({"choices": [{"index": 0, "text": text}]})
    splitter = EventSplitter(max_event_bytes=16 * 1024 * 1024)
    started = time.process_time()
    out: list[bytes] = []
    for i in range(0, len(event), 4096):
        out += splitter.feed(event[i : i + 4096])
    assert out == [event]
    assert json.loads(out[0][6:])["choices"][0]["text"] == text
    # Generous: the quadratic version needs over 100 CPU-seconds here.
    assert time.process_time() - started < 10
