"""Checks before an engine starts on vLLM's Ray executor: a cluster is given, reachable, with TP x PP GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.config.model_file import ModelFile, load_model_file
from serve.ray.cluster import RayClusterError, check_ray_executor

ROOT = Path(__file__).resolve().parents[2]
MULTINODE = ROOT / "configs/models/llama-2-70b-chat-multinode.yaml"


def cluster(gpus: float) -> dict[str, float]:
    return {"CPU": 64.0, "GPU": gpus, "memory": 1e12}


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_eight_gpus_are_enough_for_tp4_pp2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    asked: list[str] = []

    def resources(address: str) -> dict[str, float]:
        asked.append(address)
        return cluster(8)

    assert check_ray_executor(load_model_file(MULTINODE), resources) == "head:6379"
    assert asked == ["head:6379"]


def test_too_few_gpus_names_the_sizes_and_the_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    with pytest.raises(RayClusterError) as err:
        check_ray_executor(load_model_file(MULTINODE), lambda _: cluster(4))
    message = str(err.value)
    assert "tensor_parallel_size 4 x pipeline_parallel_size 2 needs 8 GPUs" in message
    assert "head:6379 has 4" in message


def test_a_cluster_without_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    with pytest.raises(RayClusterError, match="has 0"):
        check_ray_executor(load_model_file(MULTINODE), lambda _: {"CPU": 8.0})


def test_no_cluster_given_says_where_to_give_one() -> None:
    with pytest.raises(RayClusterError, match=r"set ray.address in the model file or RAY_ADDRESS"):
        check_ray_executor(load_model_file(MULTINODE), lambda _: cluster(8))


def test_the_model_files_address_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "elsewhere:6379")
    model = ModelFile.model_validate(
        {
            "name": "m",
            "source": "a/b",
            "engine": {"max_model_len": 512, "tensor_parallel_size": 2, "distributed_executor_backend": "ray"},
            "policy": {"max_tokens_cap": 10},
            "ray": {"address": "head:6379"},
        }
    )
    asked: list[str] = []
    check_ray_executor(model, lambda address: asked.append(address) or cluster(2))
    assert asked == ["head:6379"]


def test_an_unreachable_cluster_is_reported_with_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")

    def unreachable(address: str) -> dict[str, float]:
        raise RayClusterError(f"cannot connect to the Ray cluster at {address}: ConnectionError")

    with pytest.raises(RayClusterError, match=r"^llama-2-70b-chat: cannot connect to the Ray cluster at head:6379"):
        check_ray_executor(load_model_file(MULTINODE), unreachable)
