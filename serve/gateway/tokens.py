"""Counting prompt tokens in the gateway with the model's own tokenizer and chat template (or an estimate)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Without a tokenizer: English averages ~4 characters a token; 3 over-counts, which is the safe side for limits.
CHARS_PER_TOKEN_ESTIMATE = 3
# Exact counts remembered (by the prompt's hash), and template scaffolding sizes remembered (by the roles).
CACHE_ENTRIES = 2048
# Tokens a tokenizer may add beyond the bytes of a text (a dummy prefix, a BOS of its own): the bound's margin.
BOUND_SLACK = 8


@dataclass(frozen=True)
class PromptInfo:
    tokens: int
    exact: bool
    # The longest single prompt (a completions request may carry several); what must fit the context.
    longest: int
    # Hash of the prompt's first N tokens (or characters, when estimating): the prefix-affinity key.
    prefix_key: str
    # Counting stopped at a cheap bound that already exceeds the room left: `tokens` is a lower bound.
    lower_bound: bool = False
    # Counting stopped at a cheap bound that fits the room left: `tokens` is an upper bound.
    upper_bound: bool = False


def _raise(message: str) -> None:
    raise ValueError(message)


class TokenCounter:
    def __init__(self, folder: Path | None, prefix_tokens: int) -> None:
        self.prefix_tokens = prefix_tokens
        self.tokenizer: Any = None
        self.template: Any = None
        if folder is None or not (folder / "tokenizer.json").is_file():
            return
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # Some tokenizer files pad or cut every input to a fixed length (all-MiniLM-L6-v2's: 128); a count is of
        # the input's own tokens.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        # No token covers more characters than its vocabulary string has, so len(text) // this is a lower bound
        # on the count: a huge prompt is refused without spending seconds tokenizing it.
        self.max_token_chars = max((len(t) for t in self.tokenizer.get_vocab(with_added_tokens=True)), default=1)
        source = self._template_source(folder)
        if source is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
            self.template = env.from_string(source)
        self.special = self._special_tokens(folder)
        self._counts: OrderedDict[int, PromptInfo] = OrderedDict()
        self._scaffolding: OrderedDict[tuple[str, ...], int] = OrderedDict()

    @staticmethod
    def _template_source(folder: Path) -> str | None:
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text()
        config = folder / "tokenizer_config.json"
        if config.is_file():
            template = json.loads(config.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
        return None

    @staticmethod
    def _special_tokens(folder: Path) -> dict[str, str]:
        config = folder / "tokenizer_config.json"
        data = json.loads(config.read_text()) if config.is_file() else {}
        return {k: v for k in ("bos_token", "eos_token") if isinstance(v := data.get(k), str)}

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def _info(self, text: str, add_special: bool, room: int | None = None) -> PromptInfo:
        if self.tokenizer is not None and room is not None and len(text) // self.max_token_chars > room:
            bound = len(text) // self.max_token_chars
            return PromptInfo(bound, exact=True, longest=bound, prefix_key="", lower_bound=True)
        if self.tokenizer is None:
            head = text[: self.prefix_tokens * CHARS_PER_TOKEN_ESTIMATE]
            tokens = -(-len(text.encode()) // CHARS_PER_TOKEN_ESTIMATE)
            key = hashlib.blake2b(head.encode(), digest_size=8).hexdigest()
            return PromptInfo(tokens, exact=False, longest=tokens, prefix_key=key)
        ids = self.tokenizer.encode(text, add_special_tokens=add_special).ids
        head_bytes = json.dumps(ids[: self.prefix_tokens]).encode()
        key = hashlib.blake2b(head_bytes, digest_size=8).hexdigest()
        return PromptInfo(len(ids), exact=True, longest=len(ids), prefix_key=key)

    def chat(self, messages: list[dict[str, Any]], room: int | None = None, exact: bool = True) -> PromptInfo:
        """The prompt's tokens through the chat template.

        With `exact=False` (nothing needs the exact count, only that the prompt fits) a bound that fits `room` is
        answered without rendering or tokenizing: every token covers at least one byte, so the bytes of the
        template's scaffolding plus those of the contents bound the count from above.
        """
        if self.tokenizer is None:
            return self._chat(messages, room)
        if not exact and room is not None:
            upper = self._chat_upper_bound(messages)
            if upper is not None and upper <= room:
                return PromptInfo(upper, exact=False, longest=upper, prefix_key="", upper_bound=True)
        key = _cache_key(messages)
        if key is None:
            return self._chat(messages, room)
        found = self._counts.get(key)
        if found is not None:
            self._counts.move_to_end(key)
            return found
        info = self._chat(messages, room)
        if not info.lower_bound:  # a bound depends on the room it was checked against; a count does not
            self._remember(self._counts, key, info)
        return info

    def _chat_upper_bound(self, messages: list[dict[str, Any]]) -> int | None:
        roles: list[str] = []
        size = 0
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if len(m) != 2 or not isinstance(role, str) or not isinstance(content, str):
                return None  # tools, names, parts: the template may render them; count exactly
            roles.append(role)
            size += len(content.encode("utf-8", "surrogatepass"))
        shape = tuple(roles)
        scaffolding = self._scaffolding.get(shape)
        if scaffolding is None:
            empty = [{"role": role, "content": ""} for role in roles]
            try:
                text = self.template.render(messages=empty, add_generation_prompt=True, **self.special)
            except Exception:
                text = "\n".join(f"{role}: " for role in roles)
            scaffolding = len(text.encode("utf-8"))
            self._remember(self._scaffolding, shape, scaffolding)
        return scaffolding + size + len(messages) + BOUND_SLACK

    @staticmethod
    def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        cache[key] = value
        if len(cache) > CACHE_ENTRIES:
            cache.popitem(last=False)

    def _chat(self, messages: list[dict[str, Any]], room: int | None = None) -> PromptInfo:
        if self.template is not None:
            try:
                text = self.template.render(messages=messages, add_generation_prompt=True, **self.special)
                return self._info(text, add_special=False, room=room)
            except Exception as exc:  # a template that cannot render these messages: fall back to the text
                log.debug("chat template did not render: %s", exc)
        return self._info("\n".join(_message_text(m) for m in messages), add_special=True, room=room)

    def completion(self, prompt: object, room: int | None = None, exact: bool = True) -> PromptInfo:
        if not exact and room is not None and self.tokenizer is not None and isinstance(prompt, str):
            upper = len(prompt.encode("utf-8", "surrogatepass")) + BOUND_SLACK
            if upper <= room:
                return PromptInfo(upper, exact=False, longest=upper, prefix_key="", upper_bound=True)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = [int(t) for t in prompt]
            key = hashlib.blake2b(json.dumps(ids[: self.prefix_tokens]).encode(), digest_size=8).hexdigest()
            return PromptInfo(len(ids), exact=True, longest=len(ids), prefix_key=key)
        if isinstance(prompt, list):
            infos = [self.completion(p, room) for p in prompt]
            if not infos:
                return self._info("", add_special=True)
            return PromptInfo(
                sum(i.tokens for i in infos),
                all(i.exact for i in infos),
                longest=max(i.longest for i in infos),
                prefix_key=infos[0].prefix_key,
            )
        return self._info(str(prompt), add_special=True, room=room)


def _cache_key(messages: list[dict[str, Any]]) -> int | None:
    """A hash of plain role/content messages (str hashes are SipHash, seeded per process), None for anything else."""
    pairs = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if len(m) != 2 or not isinstance(role, str) or not isinstance(content, str):
            return None
        pairs.append((role, content))
    return hash(tuple(pairs))


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return f"{message.get('role', '')}: {content or ''}"
