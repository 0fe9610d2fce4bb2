"""`llmserve bench`: the load-test commands, which live in loadtests/ beside this package."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

# loadtests/ ships in the source tree next to serve/ (it is not part of the installed package).
ROOT = Path(__file__).resolve().parents[1]


def add_bench_parser(sub: Any) -> None:
    """Register `bench` on the CLI; without loadtests/ it explains instead of breaking the other commands."""
    if (ROOT / "loadtests").is_dir() and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        module = importlib.import_module("loadtests.cli")
    except ImportError:
        bench = sub.add_parser("bench", help="load tests (needs a source checkout with loadtests/)")
        bench.set_defaults(func=_missing)
        return
    module.add_bench_parser(sub)


def _missing(args: argparse.Namespace) -> int:
    print("error: `llmserve bench` needs the loadtests/ folder of a source checkout", file=sys.stderr)
    return 2
