"""The engines in the rendered manifests run the launcher on the model file itself: the vLLM command a pod runs is
exactly what `llmserve engine` builds from the model file in configs/models, and no flag is copied by hand."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from serve.cli import cmd_engine, parser
from serve.config.model_file import RESERVED_FLAGS, ModelFile, load_model_file
from serve.engine.command import build_engine_command, engine_args
from tests.k8s.rendering import ROOT, Obj, PodTemplate, launcher_argv, mount_source, pod_templates, source_models

WEIGHTS = "/models/prepared"


def parsed(container: Obj) -> argparse.Namespace:
    argv = launcher_argv(container)
    assert argv[0] == "llmserve"
    return parser().parse_args(argv[1:])


def engine_pods(overlay: str, objs: list[Obj]) -> list[tuple[PodTemplate, Obj]]:
    pods = [(t, c) for t in pod_templates(objs) if t.component == "engine" for c in t.containers[:1]]
    assert len(pods) == len(source_models(overlay)), "one engine per model file"
    return pods


def test_engine_container_runs_the_launcher_on_the_mounted_model_file(overlay: str, objs: list[Obj]) -> None:
    for t, c in engine_pods(overlay, objs):
        args = parsed(c)
        assert args.func is cmd_engine and args.weights is None and not args.print
        cm, key = mount_source(objs, t, c, args.model_file)
        mounted = ModelFile.model_validate(yaml.safe_load(cm["data"][key]))
        path, source = source_models(overlay)[t.model or ""]
        assert mounted == source, f"{t.owner} mounts a model file that differs from {path}"
        assert args.port == next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
        assert args.host == "0.0.0.0"


def test_vllm_command_equals_the_launchers(
    overlay: str, objs: list[Obj], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run the CLI on the ConfigMap's content, as the pod does, and compare with the command built from configs/."""
    for t, c in engine_pods(overlay, objs):
        args = parsed(c)
        cm, key = mount_source(objs, t, c, args.model_file)
        copy = tmp_path / f"{t.model}.yaml"
        copy.write_text(cm["data"][key])
        args.model_file, args.weights, args.print = str(copy), WEIGHTS, True
        assert cmd_engine(args) == 0
        printed = capsys.readouterr().out.split()
        path, _ = source_models(overlay)[t.model or ""]
        expected = build_engine_command(load_model_file(path), WEIGHTS, args.host, args.port)
        assert printed == expected.argv, t.owner


def test_prepare_step_reads_the_same_model_file(overlay: str, objs: list[Obj]) -> None:
    for t, engine in engine_pods(overlay, objs):
        (prepare,) = [c for c in t.spec.get("initContainers", []) if c["name"] == "prepare"]
        args = parsed(prepare)
        assert (args.command, args.models_command) == ("models", "prepare")
        assert args.ref == parsed(engine).model_file
        assert mount_source(objs, t, prepare, args.ref) == mount_source(objs, t, engine, args.ref)


def test_no_engine_flag_is_written_in_a_manifest(objs: list[Obj]) -> None:
    models = [load_model_file(p) for p in sorted((ROOT / "configs" / "models").glob("*.yaml"))]
    vllm_flags = {a for m in models for a in engine_args(m, WEIGHTS) if a.startswith("-")} | RESERVED_FLAGS
    # Where the engine listens belongs to the pod, and is an option of the launcher itself.
    vllm_flags -= {"--host", "--port"}
    for t in pod_templates(objs):
        for c in t.all_containers:
            words = " ".join(list(c.get("command", [])) + list(c.get("args", []))).split()
            copied = sorted({w.split("=")[0] for w in words} & vllm_flags)
            assert not copied, f"{t.owner} container {c['name']} sets {copied}: they belong in the model file"
