"""Model files: the shipped ones load; mistakes are refused with the file and field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.config.loader import ConfigError
from serve.config.model_file import ModelFile, load_model_file, model_file_data

ROOT = Path(__file__).resolve().parents[2]
MODELS = sorted((ROOT / "configs" / "models").glob("*.yaml"))

BASE = """
name: m
source: org/model
engine:
  max_model_len: 2048
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


def test_every_shipped_model_file_loads() -> None:
    names = {load_model_file(path).name for path in MODELS}
    assert names == {
        "smollm2-135m-instruct",
        "smollm2-135m-instruct-ray",
        "llama-2-13b-chat",
        "llama-2-70b-chat",
        "tiny-llama-tp2",
        "all-minilm-l6-v2",
    }


def test_llama_2_13b_is_tensor_parallel_fp16_4k() -> None:
    model = load_model_file(ROOT / "configs/models/llama-2-13b-chat.yaml")
    assert (model.engine.device, model.engine.dtype, model.engine.max_model_len) == ("cuda", "float16", 4096)
    assert model.engine.tensor_parallel_size == 2
    assert model.engine.world_size == 2


def test_unknown_field_names_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "  max_model_length: 10\n")
    with pytest.raises(ConfigError) as err:
        load_model_file(path)
    assert str(path) in str(err.value)
    assert "engine.max_model_length" in str(err.value)


def test_reserved_flag_in_extra_args_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "  extra_args: ['--port=9000']\n")
    with pytest.raises(ConfigError, match="--port is set by a typed field"):
        load_model_file(path)


def test_secret_in_engine_env_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "  env: {HF_TOKEN: abc}\n")
    with pytest.raises(ConfigError, match="HF_TOKEN is a secret"):
        load_model_file(path)


def test_synthetic_needs_dummy_weights(tmp_path: Path) -> None:
    text = """
name: t
synthetic: {tokenizer_from: smollm2-135m-instruct, config: {model_type: llama}}
engine: {max_model_len: 512}
policy: {max_tokens_cap: 64}
"""
    with pytest.raises(ConfigError, match="load_format: dummy"):
        load_model_file(write(tmp_path, text))


def test_source_and_synthetic_are_exclusive(tmp_path: Path) -> None:
    text = BASE + "synthetic: {tokenizer_from: x, config: {model_type: llama}}\n"
    with pytest.raises(ConfigError, match="exactly one of source"):
        load_model_file(write(tmp_path, text))


def test_policy_defaults_only_sampling_parameters(tmp_path: Path) -> None:
    text = BASE.replace("2048", "4096") + "policy: {defaults: {temperature: 0.1, model: other}}\n"
    with pytest.raises(ConfigError, match="not sampling parameters: model"):
        load_model_file(write(tmp_path, text))


def test_cap_must_fit_the_context(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_tokens_cap must be below"):
        load_model_file(write(tmp_path, BASE + "policy: {max_tokens_cap: 4096}\n"))


def test_default_above_cap_is_refused(tmp_path: Path) -> None:
    text = BASE + "policy: {max_tokens_cap: 100, default_max_tokens: 200}\n"
    with pytest.raises(ConfigError, match="default_max_tokens is above"):
        load_model_file(write(tmp_path, text))


def test_not_yaml_and_not_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model_file(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_model_file(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_model_file(tmp_path / "missing.yaml")


def test_extends_merges_mappings_and_replaces_lists_and_scalars(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        BASE + "  dtype: float32\n  extra_args: [--a, --b]\naliases: [x, y]\npolicy: {defaults: {temperature: 0.5}}\n"
    )
    child = tmp_path / "child.yaml"
    child.write_text(
        "extends: base.yaml\nname: c\naliases: [z]\nengine: {extra_args: [--c], max_num_seqs: 8}\n"
        "policy: {defaults: {seed: 1}}\n"
    )
    model = load_model_file(child)
    assert (model.name, model.aliases, model.source) == ("c", ["z"], "org/model")
    assert (model.engine.dtype, model.engine.max_model_len, model.engine.max_num_seqs) == ("float32", 2048, 8)
    assert model.engine.extra_args == ["--c"], "a list replaces the one it extends"
    assert model.policy.defaults == {"temperature": 0.5, "seed": 1}, "a mapping merges with the one it extends"
    assert "extends" not in model_file_data(child)


def test_extends_null_removes_a_section(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(BASE + "ray: {serve: {}}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nray: null\n")
    assert load_model_file(tmp_path / "base.yaml").ray is not None
    assert load_model_file(tmp_path / "child.yaml").ray is None


def test_extends_chain_is_relative_to_each_files_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").mkdir()
    (tmp_path / "root.yaml").write_text(BASE + "tokenizer: tok\n")
    (tmp_path / "a" / "mid.yaml").write_text("extends: ../root.yaml\nengine: {max_num_seqs: 4}\n")
    (tmp_path / "a" / "b" / "leaf.yaml").write_text("extends: ../mid.yaml\nname: leaf\n")
    model = load_model_file(tmp_path / "a" / "b" / "leaf.yaml")
    assert (model.name, model.engine.max_num_seqs) == ("leaf", 4)
    # The tokenizer path was written in root.yaml: it starts at root.yaml's folder, not the leaf's.
    assert model.tokenizer == str(tmp_path / "tok")


def test_error_in_an_extended_file_names_that_file_and_the_field(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(BASE + "  dtype: float8\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nname: c\nengine: {max_num_seqs: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_model_file(child)
    text = str(err.value)
    assert text.startswith(f"{child}: invalid configuration")
    assert (
        f"engine.dtype: Input should be 'auto', 'float16', 'bfloat16' or 'float32' (set in {tmp_path / 'base.yaml'})"
        in text
    )
    line = next(line for line in text.splitlines() if "engine.max_num_seqs" in line)
    assert "set in" not in line, "a field of the file itself needs no other file named"


def test_extends_cycle_and_missing_base_are_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(BASE + "extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends makes a cycle"):
        load_model_file(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text(BASE + "extends: ./self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_model_file(tmp_path / "self.yaml")
    (tmp_path / "orphan.yaml").write_text(BASE + "extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nowhere.yaml'}: file not found"):
        load_model_file(tmp_path / "orphan.yaml")
    (tmp_path / "bad.yaml").write_text(BASE + "extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match="extends: expected the name of another file"):
        load_model_file(tmp_path / "bad.yaml")


def test_relative_paths_start_at_the_model_files_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "m.yaml"
    path.write_text(BASE.replace("org/model", "./weights") + "tokenizer: ../tok\n")
    monkeypatch.chdir(tmp_path)
    model = load_model_file("models/m.yaml")
    assert model.source == str(folder / "weights")
    assert model.tokenizer == str(tmp_path / "tok")
    # Hugging Face ids and bundled names are not paths.
    assert load_model_file(write(tmp_path, BASE)).source == "org/model"
    synthetic = "name: t\nsynthetic: {tokenizer_from: ../tok, config: {model_type: llama}}\n"
    path.write_text(synthetic + "engine: {max_model_len: 512, load_format: dummy}\npolicy: {max_tokens_cap: 64}\n")
    assert load_model_file(path).synthetic.tokenizer_from == str(tmp_path / "tok")  # type: ignore[union-attr]


def test_ray_file_is_the_local_file_on_ray_serve() -> None:
    """smollm2-135m-cpu-ray.yaml extends smollm2-135m-cpu.yaml and changes only its name and the ray section."""
    local = load_model_file(ROOT / "configs/models/smollm2-135m-cpu.yaml")
    ray = load_model_file(ROOT / "configs/models/smollm2-135m-cpu-ray.yaml")
    assert (
        ray.model_copy(update={"name": local.name, "aliases": local.aliases, "ray": None, "policy": local.policy})
        == local
    )
    assert ray.ray is not None and ray.ray.serve is not None and ray.ray.serve.autoscaling is not None
    assert ray.policy.routing.health_path == "/v1/models"
    assert ray.policy.model_copy(update={"routing": local.policy.routing}) == local.policy


@pytest.mark.parametrize("name", ["a/../../etc", "..", "org/..", "a//b", "org/", "./x"])
def test_names_cannot_leave_the_cache_folder(name: str) -> None:
    data = {"name": name, "source": "a/b", "engine": {"max_model_len": 100}, "policy": {"max_tokens_cap": 10}}
    with pytest.raises(ValueError):
        ModelFile.model_validate(data)
    with pytest.raises(ValueError):
        ModelFile.model_validate({**data, "name": "ok", "aliases": [name]})
