"""bench/bench_gpu.py --tiny end to end on the CPU, in a subprocess that can import only what the GPU machine has
(torch, numpy, pyyaml, safetensors, tiktoken): Ray, MLflow, transformers and the data stack are shadowed by
modules that fail to import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "transformers", "datasets", "pyarrow", "pandas")


@pytest.mark.slow  # a whole bench run in a subprocess (torch.compile's tracing, an XL-shaped step): ~18 s
def test_tiny_run_prints_every_section(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    for name in ABSENT_ON_THE_GPU_MACHINE:
        (shadow / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"}
    out = tmp_path / "bench.json"
    # the eager backend: dynamo traces the model; inductor's C++ build would take ~40 s of this machine's CPU
    proc = subprocess.run([sys.executable, "bench/bench_gpu.py", "--tiny", "--compile-backend=eager", f"--out={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for section in ("== throughput", "a. fp32 + TF32, eager", "b. bf16, eager", "c. bf16 + torch.compile",
                    "c'. c, stats read every 10 updates", "== bf16 vs fp32 loss, 20 updates", ": ok",
                    "== generation, greedy", "identical tokens: True", "GPT-2 XL shape, bf16 eager", "== XL step",
                    "== FSDP, 1 rank, bf16: ok"):
        assert section in text, section
    results = json.loads(out.read_text())
    assert [row["config"][:2] for row in results["throughput"]] == ["a.", "b.", "c.", "c'"]
    assert all(row["tokens_per_s"] > 0 and row["mfu"] is None for row in results["throughput"])  # no MFU on a CPU
    assert len(results["bf16_loss"]["bf16"]) == 20 and results["bf16_loss"]["max_rel_diff"] < 2e-2
    assert results["generation"]["identical"] and results["xl_step"]["num_params"] > 0
    fsdp = results["fsdp"]
    assert fsdp["resume_max_rel_diff"] == 0.0 and fsdp["sharded_files"] == [".metadata", "__0_0.distcp"]  # CPU: exact
