"""tests/bench.py runs end to end: every method's rows on a few tiny batches, its table printed and its JSON written
(slow: a minute on a CPU). The figures themselves are the benchmark's to measure, not a test's to bound."""

import json

import pytest

from conftest import run_script

import bench

ROWS = ("floor", "step_device_data", "step_cpu_data", "augment_device", "augment_cpu")


@pytest.mark.slow
def test_bench_times_every_method_prints_its_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("tests/bench.py", "--device", "cpu", "--batch-size", "32", "--steps", "1", "--repeats", "1",
                        "--workers", "0", "--images", "1024", "--json", out, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results) == {"config", *bench.METHODS}
    for method in bench.METHODS:
        assert f"{method}: tiny, batch 32" in result.stdout
        for row in ROWS:
            rounds = results[method][row]["rounds"]
            assert len(rounds) == 1 and rounds[0] > 0, (method, row)
            assert results[method][row]["images_per_s"] == rounds[0]
        for row in ("step_device_data", "step_cpu_data"):  # one round: its ratio is that round's
            ratio = results[method][row]["vs_floor"]
            assert ratio == pytest.approx(results[method][row]["rounds"][0] / results[method]["floor"]["rounds"][0])
