"""`benchmarks/gpu_acceptance.py --smoke`: the one-command GPU acceptance run, on the CPU at tiny
sizes, so that it cannot rot between the rare occasions it meets a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from acceptance_sections import peak_tflops  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_run_writes_a_report_that_says_it_is_not_gpu(tmp_path):
    """Every section runs; a worker killed mid-item (injected) costs only that item, the rest
    of its section still runs, and the report says no figure in it is a GPU figure."""
    report = tmp_path / "acceptance.md"
    env = {**os.environ, "ACCEPTANCE_CRASH_ITEM": "configs/paper/c4_switchall_47m.yaml"}
    cmd = [sys.executable, "benchmarks/gpu_acceptance.py", "--smoke", "--out", str(report)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    text = report.read_text()
    assert proc.returncode == 1, proc.stderr[-3000:]  # the injected crash is a failure
    assert "CPU smoke run: no figure in this report is a GPU figure" in text
    assert "Real GPU figures" not in text
    assert text.count("CPU smoke: not GPU figures. Status: done") == 4, text
    # No GPU: every kernel test collected and skipped, none failed.
    assert re.search(r"\| (\d+) \| 0 \| 0 \| \1 \| 0 \| - \|", text), text
    for needle in ("switchhead_v_h4e4k2 | 32 | cvmm_torch", "| C4 262M | SwitchHead",
                   "| c4_transformer_262m |"):  # fmt: skip
        assert needle in text, needle
    assert "- `configs/paper/c4_switchall_47m.yaml`: worker exited with code -9" in text
    assert not list(tmp_path.glob("*.tmp"))  # written by rename, nothing half-written left


def test_peak_table_matches_gpu_names():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("Quadro RTX 6000") is None
