"""Model file -> vLLM command line and environment."""

from __future__ import annotations

from pathlib import Path

from serve.config.model_file import ModelFile, load_model_file
from serve.engine.command import VLLM_SERVER_MODULE, build_engine_command, engine_args

ROOT = Path(__file__).resolve().parents[2]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_smollm2_command_line() -> None:
    model = load_model_file(ROOT / "configs/models/smollm2-135m-cpu.yaml")
    cmd = build_engine_command(model, "/cache/smol", "127.0.0.1", 8123, python="/py")
    assert cmd.argv[:3] == ["/py", "-m", VLLM_SERVER_MODULE]
    assert flag(cmd.argv, "--model") == "/cache/smol"
    assert flag(cmd.argv, "--served-model-name") == "smollm2-135m-instruct"
    assert flag(cmd.argv, "--host") == "127.0.0.1"
    assert flag(cmd.argv, "--port") == "8123"
    assert flag(cmd.argv, "--kv-cache-memory-bytes") == str(2 * 1024**3)
    assert flag(cmd.argv, "--max-model-len") == "2048"
    assert "--enable-prefix-caching" in cmd.argv
    assert cmd.env == {"VLLM_USE_AOT_COMPILE": "0"}


def test_llama_command_line_is_tensor_parallel() -> None:
    model = load_model_file(ROOT / "configs/models/llama-2-13b-chat.yaml")
    args = engine_args(model, "/models/llama")
    assert flag(args, "--tensor-parallel-size") == "2"
    assert flag(args, "--dtype") == "float16"
    assert flag(args, "--gpu-memory-utilization") == "0.9"
    assert flag(args, "--max-model-len") == "4096"
    assert "--enable-chunked-prefill" in args


def test_tp2_cpu_binds_one_core_per_rank() -> None:
    model = load_model_file(ROOT / "configs/models/tiny-llama-tp2-cpu.yaml")
    cmd = build_engine_command(model, "/m", "127.0.0.1", 1)
    assert cmd.env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert flag(cmd.argv, "--load-format") == "dummy"


def test_false_booleans_become_no_flags_and_extra_args_come_last() -> None:
    model = ModelFile.model_validate(
        {
            "name": "m",
            "source": "a/b",
            "engine": {"max_model_len": 512, "enable_prefix_caching": False, "extra_args": ["--seed", "7"]},
            "policy": {"max_tokens_cap": 100},
        }
    )
    args = engine_args(model, "/m")
    assert "--no-enable-prefix-caching" in args
    assert "--enable-chunked-prefill" not in args and "--no-enable-chunked-prefill" not in args
    assert args[-2:] == ["--seed", "7"]


def test_no_secret_on_the_command_line() -> None:
    model = load_model_file(ROOT / "configs/models/smollm2-135m-cpu.yaml")
    cmd = build_engine_command(model, "/m", "127.0.0.1", 1)
    assert "--api-key" not in cmd.argv
    assert "VLLM_API_KEY" not in cmd.env
