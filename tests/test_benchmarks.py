"""The latency benchmark's --quick mode (the issue's CI smoke test) and --smoke mode run end to end
(no timing assertions: speed is measured, not tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import latency, openvino_baseline


def ran_variants() -> set[str]:
    """Every variant, the OpenVINO ones only where the openvino package is importable."""
    return {v for v in latency.VARIANTS
            if v not in latency.OPENVINO or openvino_baseline.openvino_available()}


def test_quick_run_writes_every_cell_table_json_and_plot(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    assert latency.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "latency_small_cpu.json").read_text())
    cells = {(c["variant"], c["context"], c["k"]) for c in report["cells"]}
    assert cells == {(v, ctx, k) for v in ran_variants() for ctx in (128, 1024) for k in (1, 16)}
    assert all(c["p50_ms"] > 0 and c["p99_ms"] >= c["p50_ms"] for c in report["cells"])
    assert (tmp_path / "latency_small_cpu.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "card/ours" in table and "hf/ours" in table
    assert report["roofline_ms"] is None  # CPU: no roofline column
    assert report["ours_step"].startswith("paged runner")


def test_load_option_runs_busy_processes_for_the_run_only(tmp_path: Path) -> None:
    with latency.competing_processes(2) as busy:
        assert len(busy) == 2 and all(process.poll() is None for process in busy)
    assert all(process.poll() is not None for process in busy)  # killed and reaped
    assert latency.main(["--smoke", "--no-plot", "--load", "1", "--variants", "ours",
                         "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "latency_tiny_cpu.json").read_text())
    assert report["competing_processes"] == 1
    assert all(c["max_ms"] >= c["p99_ms"] >= c["p50_ms"] > 0 for c in report["cells"])


def test_smoke_run_covers_the_tiny_grid(tmp_path: Path) -> None:
    assert latency.main(["--smoke", "--no-plot", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "latency_tiny_cpu.json").read_text())
    cells = {(c["variant"], c["context"], c["k"]) for c in report["cells"]}
    assert cells == {(v, ctx, k) for v in ran_variants() for ctx in (16, 64) for k in (1, 4)}


def test_without_openvino_its_columns_are_skipped_with_a_note(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency, "openvino_available", lambda: False)
    assert latency.main(["--smoke", "--no-plot", "--variants", "ours,openvino_fp32",
                         "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "latency_tiny_cpu.json").read_text())
    assert {c["variant"] for c in report["cells"]} == {"ours"} and report["openvino"] == {}
    assert "openvino: skipped (the openvino package is not importable" in capsys.readouterr().out


def test_bad_grid_values_are_rejected_naming_them() -> None:
    with pytest.raises(SystemExit):
        latency.main(["--ks", "0,4"])
    with pytest.raises(SystemExit):
        latency.main(["--variants", "ours,vllm"])


def test_gpu_check_dry_runs_every_part_on_cpu(tmp_path: Path) -> None:
    """CI keeps the one-command GPU check from rotting: --dry runs parity, latency and engine
    throughput on the tiny shape on CPU and writes both reports."""
    from benchmarks import gpu_check

    assert gpu_check.main(["--out", str(tmp_path), "--dry"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    tiny = report["shapes"]["tiny"]
    assert tiny["parity"]["ok"] and tiny["parity"]["ours_vs_transformers"] < 1e-4
    assert {c["variant"] for c in tiny["latency"]["cells"]} == {"ours", "card_loop",
                                                               "hf_dynamic_cache"}
    assert [row["sessions"] for row in tiny["engine"]["rows"]] == [1, 4]
    assert "## tiny" in (tmp_path / "gpu_check.md").read_text()


def test_profile_step_dry_profiles_each_batch_on_cpu(tmp_path: Path) -> None:
    """The GPU step profiler's harness runs on CPU (tiny shape, B = 1 and 2)."""
    from benchmarks import profile_step

    assert profile_step.main(["--out", str(tmp_path), "--dry"]) == 0
    report = json.loads((tmp_path / "profile_step.json").read_text())
    steps = report["shapes"]["tiny"]["steps"]
    assert [s["batch"] for s in steps] == [1, 2] and all(s["step_ms"] > 0 for s in steps)
    assert "tiny B=2" in (tmp_path / "profile_step.txt").read_text()


def test_engine_benchmark_quick_reports_every_cell(tmp_path: Path) -> None:
    from benchmarks import engine

    assert engine.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "engine_tiny_cpu.json").read_text())
    assert [(row["k"], row["sessions"]) for row in report["rows"]] == [(1, 1), (1, 4), (2, 1),
                                                                       (2, 4)]
    for row in report["rows"]:
        assert row["engine_tokens_per_s"] > 0 and row["fraction_of_roofline"] > 0
        assert row["roofline_tokens_per_s"] > row["engine_tokens_per_s"]


def test_soak_benchmark_runs_and_checks_itself(tmp_path: Path) -> None:
    """A few seconds of the soak run: abuse answered with the right codes, nothing unexpected,
    the pool empty at the end, closed sessions equal to the reference."""
    from benchmarks import soak

    assert soak.main(["--clients", "2", "--minutes", "0.1", "--sample-every", "1",
                      "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "soak_tiny.json").read_text())
    assert report["unexpected"] == 0 and report["kv_blocks_used_at_end"] == 0
    assert report["reference"]["checked"] > 0 and report["reference"]["mismatched"] == 0
    assert set(report["error_codes"]) <= {"too_large", "bad_request", "pool_exhausted"}


def test_proxy_benchmark_runs_and_keeps_the_text(tmp_path: Path) -> None:
    """One interleaved request pair: the proxy delivers the upstream's text unchanged (the
    benchmark exits non-zero otherwise) and reports the added latency."""
    from benchmarks import proxy

    assert proxy.main(["--shape", "tiny", "--requests", "1", "--interval-ms", "1",
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "proxy_tiny_cpu.json").read_text())
    assert report["ttft_ms"]["proxy"]["p50"] > 0 and "p99" in report["added_per_char_ms"]
    delays = report["chunk_delay_ms"]
    assert delays["proxy"]["p99"] >= delays["proxy"]["p50"] > 0 and "p50" in delays["direct"]


def test_gen_serve_benchmark_runs_both_modes(tmp_path: Path) -> None:
    from benchmarks import gen_serve

    assert gen_serve.main(["--shape", "tiny", "--max-tokens", "4", "--requests", "4",
                           "--clients", "1,2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gen_serve_tiny_cpu.json").read_text())
    assert [(row["mode"], row["clients"]) for row in report["rows"]] == [
        ("batched", 1), ("one at a time", 1), ("batched", 2), ("one at a time", 2)]
    for row in report["rows"]:
        assert row["requests"] == 4 and row["tokens_per_s"] > 0  # every request answered
