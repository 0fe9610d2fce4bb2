"""The `llmserve k8s` commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_render(args: argparse.Namespace) -> int:
    from serve.deploy.render import run

    return run(Path(args.root), args.check)


def add_k8s_parser(sub: Any) -> None:
    """Register `k8s render` on the main parser's subcommands."""
    from serve.deploy.render import add_arguments

    k8s = sub.add_parser("k8s", help="Kubernetes manifests").add_subparsers(dest="k8s_command", required=True)
    render = k8s.add_parser("render", help="write deploy/k8s/overlays/*/generated/ from the model files")
    add_arguments(render)
    render.set_defaults(func=cmd_render)
