"""Session fixtures shared by the distributed tests: one dataset, the single-process reference
runs, and two torchrun jobs (2 and 4 ranks) that run every layout's cases once.

The jobs are expensive on CPU (every rank imports torch, megatron-core and DeepSpeed and sets up
DeepSpeed's comm backend), so each job runs many cases and several tests read its results.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from switchall.config import load_run_config
from switchall.pretrain.runtime import LocalRuntime
from switchall.pretrain.trainer import Trainer
from tests.parallel.launch import SWITCHALL, TINY, TINY_TRANSFORMER, TRANSFORMER, run_cases

CURVE_STEPS = 20
SPLIT_AT = 10


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """Real text, byte tokens: a few standard-library modules, two others for validation."""
    root = tmp_path_factory.mktemp("parallel_data")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for split, names in {
        "train": ["argparse.py", "json/decoder.py", "textwrap.py", "heapq.py", "shlex.py"],
        "val": ["bisect.py", "glob.py"],
    }.items():
        (root / split).mkdir()
        for name in names:
            shutil.copy(stdlib / name, root / split / name.replace("/", "_"))
    out = root / "prepared"
    cmd = [
        sys.executable,
        "-m",
        "switchall",
        "prepare",
        str(root / "train"),
        "--val",
        str(root / "val"),
        "--out",
        str(out),
        "--tokenizer",
        "byte",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out


def overrides(dataset: Path, base: list[str], *extra: str) -> list[str]:
    return [*base, f"data.path={dataset}", *extra]


def _case(name: str, config: str, base: list[str], dataset: Path, extra, steps: int, kw) -> dict:
    return {
        "name": name,
        "config": config,
        "overrides": overrides(dataset, base, f"train.steps={steps}", *extra),
        "run_dir": kw.pop("run_dir", name),
        **kw,
    }


def switchall_case(name: str, dataset: Path, *extra: str, steps: int = 3, **kw) -> dict:
    return _case(name, SWITCHALL, TINY, dataset, extra, steps, kw)


def transformer_case(name: str, dataset: Path, *extra: str, steps: int = 3, **kw) -> dict:
    return _case(name, TRANSFORMER, TINY_TRANSFORMER, dataset, extra, steps, kw)


def resume_cases(make, name: str, dataset: Path, *extra: str, steps: int, stop: int) -> list:
    """A full run, and the same run stopped after `stop` steps then resumed (`name_stop`,
    `name_resume`, sharing a run directory)."""
    split = f"{name}_split"
    return [
        make(name, dataset, *extra, steps=steps),
        make(f"{name}_stop", dataset, *extra, steps=steps, stop_after=stop, run_dir=split),
        make(f"{name}_resume", dataset, *extra, steps=steps, resume=True, run_dir=split),
    ]


def single_process(config: str, ovr: list[str], run_dir: Path, grads: dict | None = None):
    """Train in this process; with `grads`, fill it with the first step's gradients."""
    cfg = load_run_config(config, ovr)
    trainer = Trainer(cfg, run_dir, LocalRuntime(torch.device("cpu")))
    if grads is not None:
        named = list(trainer.model.named_parameters())

        def capture(optimizer, args, kwargs):
            if not grads:
                grads.update({n: p.grad.detach().clone() for n, p in named})

        trainer.engine.optimizer.register_step_pre_hook(capture)
    return trainer.run()["history"]


@pytest.fixture(scope="session")
def reference(dataset, tmp_path_factory) -> dict:
    """Single-process histories, run directories and first-step gradients."""
    root = tmp_path_factory.mktemp("reference")
    grads: dict[str, torch.Tensor] = {}
    single_process(
        SWITCHALL, overrides(dataset, TINY, "train.steps=1", "optim.grad_clip=0"), root / "g", grads
    )
    return {
        "switchall": single_process(
            SWITCHALL, overrides(dataset, TINY, f"train.steps={CURVE_STEPS}"), root / "switchall"
        ),
        "switchall_dir": root / "switchall",
        "switchall_accum2": single_process(
            SWITCHALL, overrides(dataset, TINY, "train.steps=3", "train.grad_accum=2"), root / "a2"
        ),
        "transformer": single_process(
            TRANSFORMER, overrides(dataset, TINY_TRANSFORMER, "train.steps=6"), root / "tr"
        ),
        "switchall_grads": grads,
    }


@pytest.fixture(scope="session")
def two_ranks(dataset, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("two_ranks")
    ep2 = ("parallel.expert=2", "parallel.zero_stage=2")
    cases = [
        switchall_case("tp2", dataset, "parallel.tensor=2"),
        switchall_case("ep2_z1", dataset, "parallel.expert=2", "parallel.zero_stage=1"),
        switchall_case("dp2_z1", dataset, "parallel.zero_stage=1"),
        switchall_case("dp2_z2", dataset, "parallel.zero_stage=2"),
        *resume_cases(switchall_case, "ep2_z2", dataset, *ep2, steps=CURVE_STEPS, stop=SPLIT_AT),
        switchall_case("tp2_accum2", dataset, "parallel.tensor=2", "train.grad_accum=2"),
        switchall_case("dp2_z0_accum2", dataset, "parallel.zero_stage=0", "train.grad_accum=2"),
        switchall_case("ep2_z2_accum2", dataset, *ep2, "train.grad_accum=2"),
        transformer_case("transformer_tp2", dataset, "parallel.tensor=2"),
        transformer_case(
            "transformer_tp2_dropout",
            dataset,
            "parallel.tensor=2",
            "model.dropout=0.2",
            dump_replicated=True,
        ),
        *resume_cases(
            transformer_case, "transformer_z3", dataset, "parallel.zero_stage=3", steps=6, stop=3
        ),
        switchall_case("dispatch", dataset, "parallel.expert=2", kind="dispatch"),
        # train.compile (Dynamo capture only: the cheap backend) and activation checkpointing
        # under the distributed runtime, all-to-alls inside the recomputed blocks.
        switchall_case(
            "ep2_z1_compile_ac",
            dataset,
            "parallel.expert=2",
            "parallel.zero_stage=1",
            "train.compile=true",
            "train.compile_backend=eager",
            "train.activation_checkpointing=true",
        ),
    ]
    next(c for c in cases if c["name"] == "ep2_z2")["dump_experts"] = True
    return run_cases(2, cases, out, timeout=240), out


@pytest.fixture(scope="session")
def four_ranks(dataset, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("four_ranks")
    cases = [
        switchall_case("tp2_dp2_z1", dataset, "parallel.tensor=2", "parallel.zero_stage=1"),
        *resume_cases(
            switchall_case,
            "tp2_ep2_dp2_z2",
            dataset,
            "parallel.tensor=2",
            "parallel.expert=2",
            "parallel.zero_stage=2",
            steps=4,
            stop=2,
        ),
        switchall_case("ep2_dp4_z1", dataset, "parallel.expert=2", "parallel.zero_stage=1"),
        switchall_case(
            "ep2_dp4_z0",
            dataset,
            "parallel.expert=2",
            "optim.grad_clip=0",
            steps=1,
            capture_grads=True,
        ),
        transformer_case(
            "transformer_tp2_dp2_z3", dataset, "parallel.tensor=2", "parallel.zero_stage=3"
        ),
    ]
    return run_cases(4, cases, out, timeout=240), out


def train_records(history: list[dict]) -> list[dict]:
    return [r for r in history if "loss" in r]
