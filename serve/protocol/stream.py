"""OpenAI streams: SSE framing, what each event carries, and usage; shared by the gateway and the load tests.

TTFT means one thing everywhere: the time to the first event that carries generated output of any kind (content,
reasoning content, a tool-call delta, completion text, a Responses API delta). Classification looks at bytes first
and parses JSON only for the events that need it (usage, errors), so it stays cheap on the gateway's hot path.
"""

from __future__ import annotations

import enum
import json
from typing import Any

DONE = b"data: [DONE]\n\n"


class Kind(enum.Enum):
    OUTPUT = "output"  # generated output of any kind
    USAGE = "usage"  # the final usage event (no choices left)
    ERROR = "error"  # an error envelope in the stream
    DONE = "done"  # data: [DONE]
    OTHER = "other"  # role-only deltas, empty deltas, finish reasons, comments


class EventTooLarge(Exception):
    """An event grew past the splitter's bound without its blank line."""


# Keys whose non-empty string value is generated output, as JSON writers put them (compact or with a space).
_TEXT_KEYS = (b'"content":', b'"reasoning_content":', b'"reasoning":', b'"text":', b'"delta":', b'"arguments":')
_TOOL_CALLS = (b'"tool_calls":[{', b'"tool_calls": [{')


def _string_follows(event: bytes, at: int) -> bool:
    """Whether the JSON value starting at `at` (after optional spaces) is a non-empty string."""
    n = len(event)
    while at < n and event[at] == 0x20:
        at += 1
    return at + 1 < n and event[at] == 0x22 and event[at + 1] != 0x22


def has_output(event: bytes) -> bool:
    """Whether an event carries generated output, judged on bytes.

    A key's quotes cannot appear unescaped inside a JSON string, so a marker found in the bytes is a real key.
    `"delta":` is the Responses API's (chat deltas are objects, not strings, so they do not match).
    """
    for marker in _TEXT_KEYS:
        at = event.find(marker)
        while at != -1:
            if _string_follows(event, at + len(marker)):
                return True
            at = event.find(marker, at + 1)
    return any(marker in event for marker in _TOOL_CALLS)


def payload(event: bytes) -> bytes:
    """The data of an event (its `data:` lines joined), without the field name."""
    if event.startswith(b"data: ") and event.count(b"\n") <= 2:
        return event[6:].rstrip(b"\n")
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


def _classify_response_event(event: bytes) -> Kind:
    """A Responses API event, by its `type`: deltas are output, `response.completed` carries the usage."""
    data = data_of(event)
    kind = data.get("type") if data is not None else None
    if not isinstance(kind, str):
        return Kind.OTHER
    if kind.endswith(".delta"):
        return Kind.OUTPUT if data and isinstance(data.get("delta"), str) and data["delta"] else Kind.OTHER
    if kind == "response.completed":
        return Kind.USAGE if usage_of(event) is not None else Kind.OTHER
    if kind in ("error", "response.failed"):
        return Kind.ERROR
    return Kind.OTHER


def classify(event: bytes) -> Kind:
    """What one complete event (as the splitter returns it) carries."""
    if event.startswith(b"data: [DONE]"):
        return Kind.DONE
    if event.startswith(b"event:") or b'"type":"response.' in event:
        # Responses API events name their type; a delta's bytes are cheap to spot, the rest is parsed.
        if b'.delta"' in event and has_output(event):
            return Kind.OUTPUT
        return _classify_response_event(event)
    if has_output(event):
        return Kind.OUTPUT
    if b'"error"' in event or b'"object":"error"' in event or b'"object": "error"' in event:
        data = data_of(event)
        if data is not None and (isinstance(data.get("error"), dict | str) or data.get("object") == "error"):
            return Kind.ERROR
    if b'"usage":' in event and usage_of(event) is not None:
        return Kind.USAGE
    return Kind.OTHER


def data_of(event: bytes) -> dict[str, Any] | None:
    """The event's JSON object, or None when its data is not one."""
    try:
        data = json.loads(payload(event))
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def usage_of(event: bytes) -> dict[str, Any] | None:
    """The usage of a final usage event: chat/completions' last chunk (no choices), or `response.completed`."""
    data = data_of(event)
    if data is None:
        return None
    if data.get("type") == "response.completed" and isinstance(data.get("response"), dict):
        data = data["response"]
    elif data.get("choices"):
        return None
    usage = data.get("usage")
    return usage if isinstance(usage, dict) else None


def usage_tokens(usage: object) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens of a usage object, in either API's names."""
    if not isinstance(usage, dict):
        return None, None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return (
        prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else None,
        completion if isinstance(completion, int) and not isinstance(completion, bool) else None,
    )


def output_text(data: dict[str, Any]) -> str:
    """The generated text in one parsed event: chat deltas (content or reasoning), completion text, Responses deltas."""
    parts: list[object] = []
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            parts.append(delta.get("content"))
            parts.append(delta.get("reasoning_content") or delta.get("reasoning"))
        parts.append(choice.get("text"))
    kind = data.get("type")
    if isinstance(kind, str) and kind.endswith(".delta"):
        parts.append(data.get("delta"))
    return "".join(p for p in parts if isinstance(p, str))


def error_message(data: dict[str, Any]) -> str:
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    if isinstance(error, str):
        return error
    return str(data.get("message") or data)


def encode(data: dict[str, Any]) -> bytes:
    """One SSE event for a JSON object."""
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class EventSplitter:
    """Splits a byte stream into complete SSE events, each returned ending in one blank line.

    LF and CRLF line ends both work (CRLF is normalised to LF, also across chunk boundaries), a last event without
    its blank line comes out of `flush`, and the work is linear in the bytes fed: a large event arriving in many
    chunks is appended to, never re-copied per chunk. A chunk that holds exactly one event comes back as the same
    object, uncopied (the usual case on the hot path).
    """

    __slots__ = ("_buf", "_cr", "max_event_bytes")

    def __init__(self, max_event_bytes: int | None = None) -> None:
        """`max_event_bytes` bounds one event (a relay must not buffer without end); None: unbounded."""
        self._buf = bytearray()
        self._cr = False
        self.max_event_bytes = max_event_bytes

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._cr:
            chunk, self._cr = b"\r" + chunk, False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, self._cr = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n")
        buf = self._buf
        if not buf:
            if chunk.endswith(b"\n\n") and chunk.find(b"\n\n") == len(chunk) - 2:
                return [chunk]
            data: bytes | bytearray = chunk
            start = 0
        else:
            # The blank line may straddle the boundary: the old part ends in "\n", the new one starts with it.
            start = len(buf) - 1
            buf += chunk
            data = buf
        events: list[bytes] = []
        pos = 0
        while (end := data.find(b"\n\n", start)) != -1:
            events.append(bytes(data[pos : end + 2]))
            pos = start = end + 2
        if data is buf:
            if pos:
                del buf[:pos]
        elif pos < len(data):
            buf += data[pos:]
        if self.max_event_bytes is not None and len(buf) > self.max_event_bytes:
            size = len(buf)
            buf.clear()
            raise EventTooLarge(f"an event passed {self.max_event_bytes} bytes ({size}) without its end")
        return events

    def flush(self) -> bytes | None:
        """The last event when the stream ended without its blank line (None if nothing is left)."""
        rest = bytes(self._buf).strip(b"\n")
        self._buf.clear()
        return rest + b"\n\n" if rest.strip() else None
