"""`llmserve bench sweep`: variant files, their validation before any engine starts, and the table of results."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from loadtests import report
from loadtests.accounting import RequestRecord
from loadtests.config import DEFAULT_MODEL_FILE
from loadtests.engine_sweep import DEFAULT_SWEEP, prepare_variants, read_sweep
from loadtests.engine_sweep_procs import group
from loadtests.engine_sweep_report import markdown, variant_row
from loadtests.runner import Level, LevelResult, LoadGen
from loadtests.sanity import impossible
from loadtests.stats import SLO, Window, summarize
from serve.config.loader import ConfigError
from serve.config.model_file import ModelFile, load_model_file
from serve.engine.validate import EngineArgsError


def sweep_file(folder: Path, data: Any) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_variant_extends_the_base_and_replaces_only_its_engine_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = {"dtype": "float16", "max_num_batched_tokens": 4096, "extra_args": ["--stream-interval", "4"]}
    sweep = sweep_file(tmp_path, {"variants": {"half": {**overrides, "env": {"EXTRA": "1"}}}})
    # A base given relative to the working directory still works from the variant's own folder.
    monkeypatch.chdir(DEFAULT_MODEL_FILE.parent)
    [variant] = prepare_variants(tmp_path / "out", Path(DEFAULT_MODEL_FILE.name), sweep, None, None)

    assert variant.file == tmp_path / "out" / "half" / "model.yaml"
    written = yaml.safe_load(variant.file.read_text())
    assert written["extends"] == str(DEFAULT_MODEL_FILE.absolute())
    base, model = load_model_file(DEFAULT_MODEL_FILE), load_model_file(variant.file)
    assert base.engine.dtype != "float16" and base.engine.max_num_batched_tokens != 4096
    assert model.engine.dtype == "float16"
    assert model.engine.max_num_batched_tokens == 4096
    assert model.engine.extra_args == ["--stream-interval", "4"]
    # Mappings merge key by key: the base's own engine environment stays beside the variant's.
    assert base.engine.env and model.engine.env == {**base.engine.env, "EXTRA": "1"}
    unchanged = {"dtype", "max_num_batched_tokens", "extra_args", "env"}
    assert model.engine.model_dump(exclude=unchanged) == base.engine.model_dump(exclude=unchanged)
    assert (model.name, model.policy, model.source) == (base.name, base.policy, base.source)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"dtyp": "bfloat16"}, "engine.dtyp"), ({"dtype": "bf16"}, "engine.dtype"), ({"max_num_seqs": 0}, "max_num_seqs")],
)
def test_a_bad_setting_fails_before_any_engine_check_naming_the_file_and_field(
    tmp_path: Path, overrides: dict[str, Any], field: str
) -> None:
    sweep = sweep_file(tmp_path, {"variants": {"good": {"dtype": "bfloat16"}, "bad": overrides}})
    checked: list[ModelFile] = []
    with pytest.raises(ConfigError) as err:
        prepare_variants(tmp_path / "out", DEFAULT_MODEL_FILE, sweep, None, checked.append)
    message = str(err.value)
    assert f"variant bad of {sweep}" in message
    assert str(tmp_path / "out" / "bad" / "model.yaml") in message
    assert field in message
    assert checked == []  # not even the good variant reached vLLM's parser


def test_a_flag_vllm_refuses_fails_naming_the_variant_file(tmp_path: Path) -> None:
    sweep = sweep_file(tmp_path, {"variants": {"ok": {"dtype": "bfloat16"}, "odd": {"extra_args": ["--nope"]}}})

    def parser(model: ModelFile) -> None:
        if "--nope" in model.engine.extra_args:
            raise EngineArgsError("vllm-server: error: unrecognized arguments: --nope")

    with pytest.raises(ConfigError, match="unrecognized arguments: --nope") as err:
        prepare_variants(tmp_path / "out", DEFAULT_MODEL_FILE, sweep, None, parser)
    assert f"variant odd of {sweep}: {tmp_path / 'out' / 'odd' / 'model.yaml'}: vLLM refused" in str(err.value)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"variant": {"a": {}}}, "unknown field(s) variant"),
        ({"variants": []}, "variants: expected a mapping"),
        ({"variants": {"a b": {"dtype": "float32"}}}, "variants.a b: a name is"),
        ({"variants": {"x": "bfloat16"}}, "variants.x: expected engine settings, got str"),
    ],
)
def test_a_malformed_sweep_file_is_named(tmp_path: Path, data: Any, says: str) -> None:
    sweep = sweep_file(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        read_sweep(sweep)
    assert str(err.value).startswith(f"{sweep}: ") and says in str(err.value)


def test_only_the_named_variants_run_and_an_unknown_name_is_refused(tmp_path: Path) -> None:
    chosen = prepare_variants(tmp_path / "a", DEFAULT_MODEL_FILE, DEFAULT_SWEEP, ["bf16-async", "fp32"], None)
    assert [v.name for v in chosen] == ["fp32", "bf16-async"]  # the file's order
    assert not (tmp_path / "a" / "bf16").exists()
    with pytest.raises(ConfigError, match="no variant named bf17"):
        prepare_variants(tmp_path / "b", DEFAULT_MODEL_FILE, DEFAULT_SWEEP, ["bf16", "bf17"], None)


def test_the_shipped_sweep_loads_against_the_default_model_file(tmp_path: Path) -> None:
    variants = prepare_variants(tmp_path, DEFAULT_MODEL_FILE, DEFAULT_SWEEP, None, None)
    engines = {v.name: load_model_file(v.file).engine for v in variants}
    assert list(engines) == [
        "fp32",
        "bf16",
        "bf16-batch4k",
        "bf16-async",
        "bf16-interval",
        "bf16-seqs32",
        "bf16-no-chunked",
        "bf16-omp-both",
        "bf16-kv1",
        "bf16-kv4",
    ]
    assert [e.dtype for e in engines.values()] == ["float32", *["bfloat16"] * 9]
    assert engines["bf16-batch4k"].max_num_batched_tokens == 4096
    assert engines["bf16-async"].extra_args == ["--async-scheduling"]
    assert engines["bf16-interval"].extra_args == ["--stream-interval", "4"]
    assert engines["bf16-seqs32"].max_num_seqs == 32
    assert engines["bf16-no-chunked"].enable_chunked_prefill is False
    assert engines["bf16-omp-both"].cpu_omp_threads_bind == "0-1"
    assert [engines[n].kv_cache_memory_gib for n in ("bf16", "bf16-kv1", "bf16-kv4")] == [2, 1, 4]


def first(ttft: float, i: int, n: int) -> float:
    """The TTFT of request i of n: skewed, so that p50 is neither the mean nor p90."""
    return ttft * (0.5 + (i / n) ** 2)


def level(users: int, n: int, ttft: float, gap: float, tokens: int = 10) -> dict[str, Any]:
    """One level of a summary.json, made by the bench's own report code: `n` requests spread over a 20 s window."""
    records = [
        RequestRecord(
            id=i,
            scenario="chat",
            stream=True,
            start=i * 20 / n,
            max_tokens=tokens,
            status=200,
            ttft=first(ttft, i, n),
            e2e=first(ttft, i, n) + (tokens - 1) * gap,
            chunk_times=[first(ttft, i, n) + k * gap for k in range(tokens)],
            prompt_tokens=20,
            completion_tokens=tokens,
        )
        for i in range(n)
    ]
    window = Window(0.0, 20.0)
    summary = summarize(records, window, SLO())
    problems = impossible(summary, records, ceiling=None)
    loadgen = LoadGen(exit_code=0, wall_s=25.0, cpu_s=1.0, cpu_fraction=0.04)
    return report.result_json(LevelResult("x", Level(users=users), summary, problems, [], records, window, loadgen))


def write_variant_results(folder: Path, name: str, levels: list[dict[str, Any]], correct: int) -> dict[str, Any]:
    (folder / name / "bench").mkdir(parents=True)
    (folder / name / "quality").mkdir()
    (folder / name / "bench" / "summary.json").write_text(json.dumps({"results": levels}))
    quality = {"results": {name: {"correct": correct, "total": 44, "errors": 0, "answers": []}}}
    (folder / name / "quality" / "quality.json").write_text(json.dumps(quality))
    info = {"name": name, "overrides": {"dtype": name}, "startup_s": 12.5, "bench_exit": 0, "quality_exit": 0}
    info |= {"load_start": [0.5, 0.4, 0.3], "load_end": [1.75, 1.0, 0.5]}
    return variant_row(info, folder / name / "bench", folder / name / "quality")


def rows(text: str) -> dict[str, list[str]]:
    """The main table's rows by variant, cells stripped."""
    table = text.split("\n\n## ")[0]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    return {row[0]: row for row in cells[2:]}


Sweep = tuple[dict[str, Any], dict[tuple[str, int], dict[str, Any]]]


@pytest.fixture
def sweep(tmp_path: Path) -> Sweep:
    """Two variants' result folders and the sweep made of them, and each level's summary.json entry."""
    made = {
        "float32": [level(1, 5, 0.2, 0.05), level(8, 40, 0.3, 0.05)],
        # levels in another order than the table's
        "bf16": [level(8, 60, 0.12, 0.02, tokens=20), level(1, 25, 0.04, 0.01)],
    }
    scores = {"float32": 28, "bf16": 27}
    data = {
        "command": "llmserve bench sweep",
        "created": "now",
        "base": "/x/base.yaml",
        "sweep_file": "/x/sweep.yaml",
        "users": [1, 8],
        "output_len": 10,
        "warmup_s": 10,
        "duration_s": 20,
        "cpus": 2,
        "variants": [write_variant_results(tmp_path, name, made[name], scores[name]) for name in made],
    }
    return data, {(name, lv["level"]["users"]): lv for name, levels in made.items() for lv in levels}


TTFT = {"float32": (0.2, 0.3), "bf16": (0.04, 0.12)}


def test_the_table_has_one_row_per_variant_with_each_levels_numbers(sweep: Sweep) -> None:
    data, raw = sweep
    table = rows(markdown(data))
    assert list(table) == ["float32", "bf16"]
    for name, n in (("float32", (5, 40)), ("bf16", (25, 60))):
        levels = [raw[name, u] for u in (1, 8)]
        tok_s = [lv["output_tok_s"] for lv in levels]
        assert None not in tok_s and tok_s[0] != tok_s[1]  # the fakes tell the levels apart
        assert all(lv["ttft_s"]["p50"] not in (lv["ttft_s"]["mean"], lv["ttft_s"]["p90"]) for lv in levels)
        ttft = [statistics.median(first(t, i, k) for i in range(k)) * 1000 for t, k in zip(TTFT[name], n, strict=True)]
        row = table[name]
        assert [c.removesuffix(" †") for c in row[2:4]] == [f"{t:,.1f}" for t in tok_s]
        assert [c.removesuffix(" †") for c in row[4:6]] == [f"{t:,.1f}" for t in ttft]
        assert row[1] == f"dtype={name}"
        assert row[7:] == ["12.5", "0.50 → 1.75"]
    assert (table["float32"][6], table["bf16"][6]) == ("28/44", "27/44")


def test_a_level_with_fewer_than_20_measured_requests_is_flagged(sweep: Sweep) -> None:
    data, _ = sweep
    flags = {
        (v["name"], lv["users"]): (lv["samples"], lv["low_samples"]) for v in data["variants"] for lv in v["levels"]
    }
    assert flags == {
        ("float32", 1): (5, True),
        ("float32", 8): (40, False),
        ("bf16", 1): (25, False),
        ("bf16", 8): (60, False),
    }
    text = markdown(data)
    table = rows(text)
    assert table["float32"][2].endswith(" †") and table["float32"][4].endswith(" †")
    assert not any(cell.endswith("†") for cell in [*table["float32"][3:4], *table["float32"][5:6], *table["bf16"]])
    samples = text.split("## Measured requests per level")[1]
    assert "| float32 | 5 *few samples* | 40 |" in samples
    assert "| bf16 | 25 | 60 |" in samples
    assert "float32 at 1 users: *few samples*: `--duration 80` would measure 20" in text


def test_a_refused_level_shows_no_figures(tmp_path: Path) -> None:
    buffered = level(8, 30, 0.1, 0.0)  # every token at once: something buffered the stream
    assert not buffered["valid"]
    row = write_variant_results(tmp_path, "v", [level(1, 30, 0.1, 0.02), buffered], 20)
    sweep = {"users": [1, 8], "variants": [row]}
    from loadtests.engine_sweep_report import samples_table, table

    cells = rows("\n".join(table(sweep)))["v"]
    assert cells[3] == cells[5] == "refused" and cells[2] != "refused"
    assert "| v | 30 | 30 |" in samples_table(sweep)


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody has reaped yet."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_an_engine_is_stopped_with_its_whole_process_group_even_on_an_error(tmp_path: Path) -> None:
    # A leader and a child that both ignore TERM: only the KILL after the grace ends them.
    pid_file = tmp_path / "child"
    script = f"trap '' TERM; sleep 60 & echo $! > {pid_file}; wait"
    with pytest.raises(RuntimeError), group(["sh", "-c", script], {}, tmp_path / "log", grace=0.2) as proc:
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.02)
        raise RuntimeError("the load failed")
    assert proc.returncode is not None
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while alive(child):
        assert time.monotonic() < deadline, f"the engine's child {child} outlived the stop"
        time.sleep(0.05)
