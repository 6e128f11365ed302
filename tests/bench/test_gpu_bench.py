"""bench/gpu.py, the one command prepared for a lent GPU machine, run with --smoke (tiny sizes on the CPU) so that it
cannot rot between the sessions that get a GPU: every phase ends and appends its `phase=` line of figures, and the
last line on stdout carries them all."""

from __future__ import annotations

from pathlib import Path

from tests.bench.smoke import run_smoke

PHASES = ("env", "data", "extraction", "training", "serving")
# train_mem_ratio is CUDA's max_memory_allocated: nan on the CPU
HEADLINE = (
    "pipeline_efficiency_photos",
    "pipeline_efficiency_digits",
    "extract_ratio",
    "writer_vs_disk",
    "train_speedup",
    "compile_speedup",
    "latency_ratio",
    "multi_model_cost_ratio",
)


def test_every_phase_of_the_gpu_bench_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.txt"
    run = run_smoke("gpu.py", "--out", str(out))
    lines = {
        line.split()[0].removeprefix("phase="): dict(kv.split("=", 1) for kv in line.split()[1:])
        for line in out.read_text().splitlines()
    }
    assert tuple(lines) == PHASES, lines.keys()
    assert float(lines["extraction"]["whole_img_s_digits"]) > 0
    assert float(lines["training"]["train_speedup"]) > 0
    assert float(lines["serving"]["latency_ratio"]) > 0
    assert all(value > 0 for value in run.numbers(*HEADLINE).values())
