"""Session fixtures shared by the distributed tests: one dataset, the single-process reference
runs, and two torchrun jobs (2 and 4 ranks) that run every layout's cases once.

The jobs are expensive on CPU (every rank imports torch, megatron-core and DeepSpeed and sets up
DeepSpeed's comm backend), so each job runs many cases and several tests read its results.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from switchall.cli import main as cli_main
from switchall.config import load_run_config
from switchall.pretrain.runtime import LocalRuntime
from switchall.pretrain.trainer import Trainer
from tests.parallel.launch import SWITCHALL, TINY, TINY_TRANSFORMER, TRANSFORMER, run_cases
from tests.subproc import subprocess_env

CURVE_STEPS = 20
SPLIT_AT = 10
# Export directories (`switchall export`, `model.init_from`) need the export writer and reader.
HAVE_EXPORTS = importlib.util.find_spec("switchall.models.pretrained") is not None


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
    subprocess.run(cmd, check=True, capture_output=True, timeout=120, env=subprocess_env())
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


WEIGHT_STEPS = (1, 3)  # parity cases dump their weights after these optimiser steps


def single_process(
    config: str,
    ovr: list[str],
    run_dir: Path,
    grads: dict | None = None,
    weights: dict | None = None,
    stop_after: int | None = None,
):
    """Train in this process; with `grads`, fill it with the first step's gradients; with
    `weights`, with {step: {name: parameter}} after each step of WEIGHT_STEPS; with
    `stop_after`, stop (with a checkpoint) after that many steps."""
    cfg = load_run_config(config, ovr)
    trainer = Trainer(cfg, run_dir, LocalRuntime(torch.device("cpu")))
    named = list(trainer.model.named_parameters())
    if grads is not None:

        def capture(optimizer, args, kwargs):
            if not grads:
                grads.update({n: p.grad.detach().clone() for n, p in named})

        trainer.engine.optimizer.register_step_pre_hook(capture)
    if weights is not None:
        train_step = trainer.train_step

        def train_step_then_copy(batch):
            stats = train_step(batch)
            if trainer.step + 1 in WEIGHT_STEPS:
                weights[trainer.step + 1] = {n: p.detach().clone() for n, p in named}
            return stats

        trainer.train_step = train_step_then_copy
    return trainer.run(stop_after=stop_after)["history"]


@pytest.fixture(scope="session")
def reference(dataset, tmp_path_factory) -> dict:
    """Single-process histories, run directories and first-step gradients."""
    root = tmp_path_factory.mktemp("reference")
    grads: dict[str, torch.Tensor] = {}
    single_process(
        SWITCHALL, overrides(dataset, TINY, "train.steps=1", "optim.grad_clip=0"), root / "g", grads
    )
    weights: dict[str, dict] = {"switchall": {}, "transformer": {}}
    curve = overrides(dataset, TINY, f"train.steps={CURVE_STEPS}")
    refs = {
        "switchall": single_process(
            SWITCHALL, curve, root / "switchall", weights=weights["switchall"]
        ),
        "switchall_dir": root / "switchall",
        # Stopped at SPLIT_AT with a checkpoint: the one-process source of the resharding tests.
        "switchall_stop": single_process(SWITCHALL, curve, root / "stop", stop_after=SPLIT_AT),
        "switchall_stop_dir": root / "stop",
        "switchall_accum2": single_process(
            SWITCHALL, overrides(dataset, TINY, "train.steps=3", "train.grad_accum=2"), root / "a2"
        ),
        "transformer": single_process(
            TRANSFORMER,
            overrides(dataset, TINY_TRANSFORMER, "train.steps=6"),
            root / "tr",
            weights=weights["transformer"],
        ),
        "switchall_grads": grads,
        "weights": weights,
    }
    if HAVE_EXPORTS:  # the 20-step model exported, and a new run started from it
        export = root / "export"
        assert cli_main(["export", str(refs["switchall_dir"]), "--out", str(export)]) == 0
        init = overrides(dataset, TINY, "train.steps=3", f"model.init_from={export}")
        refs["export_dir"] = export
        refs["init_from"] = single_process(SWITCHALL, init, root / "init")
    return refs


def reshard_case(name: str, dataset: Path, source, stop: int, *layout: str) -> dict:
    """Resume a copy of checkpoint `stop` of run directory `source` under `layout`, dumping the
    state it loaded, and continue to the end of the source's schedule."""
    make, steps = (
        (transformer_case, 6) if "transformer" in str(source) else (switchall_case, CURVE_STEPS)
    )
    if "tp2_ep2_dp2_z2" in str(source):
        steps = 4
    return make(
        name,
        dataset,
        *layout,
        steps=steps,
        resume=True,
        copy_from=str(source),
        copy_step=stop,
        dump_state=True,
    )


# Save layout -> load layout pairs of the resharding tests: (case, source run directory, its
# checkpoint step, layout overrides). "single" is the one-process run stopped at SPLIT_AT (the
# reference fixture); the other sources are cases of the two- and four-rank jobs.
RESHARD_TWO = [
    ("dp1_to_dp2_z0", "single", SPLIT_AT, ("parallel.zero_stage=0",)),
    ("tp1_to_tp2", "single", SPLIT_AT, ("parallel.tensor=2",)),
    ("z1_to_z2", "dp2_z1_split", SPLIT_AT, ("parallel.zero_stage=2",)),
    ("z2_to_z0_ep2", "ep2_z2_split", SPLIT_AT, ("parallel.expert=2", "parallel.zero_stage=0")),
    ("ep2_to_tp2", "ep2_z2_split", SPLIT_AT, ("parallel.tensor=2",)),
    ("z3_to_z1", "transformer_z3_split", 3, ("parallel.zero_stage=1",)),
]
RESHARD_FOUR = [
    ("ep1_to_ep4", "single", SPLIT_AT, ("parallel.expert=4", "parallel.zero_stage=1")),
    ("ep2_to_ep4", "ep2_z2_split", SPLIT_AT, ("parallel.expert=4", "parallel.zero_stage=2")),
    ("tp2_ep2_to_dp4", "tp2_ep2_dp2_z2_split", 2, ("parallel.zero_stage=1",)),
    # ZeRO-3 over 4 ranks: XL's 1-element `scale` leaves ranks 1-3 nothing but padding.
    ("z3_dp2_to_dp4", "transformer_z3_split", 3, ("parallel.zero_stage=3",)),
]


@pytest.fixture(scope="session")
def two_ranks(dataset, reference, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("two_ranks")
    ep2 = ("parallel.expert=2", "parallel.zero_stage=2")
    w = {"dump_weights_at": WEIGHT_STEPS}
    single = reference["switchall_stop_dir"]
    cases = [
        switchall_case("tp2", dataset, "parallel.tensor=2", **w),
        switchall_case("ep2_z1", dataset, "parallel.expert=2", "parallel.zero_stage=1", **w),
        switchall_case("dp2_z1", dataset, "parallel.zero_stage=1", **w),
        switchall_case("dp2_z2", dataset, "parallel.zero_stage=2", **w),
        *resume_cases(switchall_case, "ep2_z2", dataset, *ep2, steps=CURVE_STEPS, stop=SPLIT_AT),
        switchall_case("tp2_accum2", dataset, "parallel.tensor=2", "train.grad_accum=2"),
        switchall_case("dp2_z0_accum2", dataset, "parallel.zero_stage=0", "train.grad_accum=2"),
        switchall_case("ep2_z2_accum2", dataset, *ep2, "train.grad_accum=2"),
        transformer_case("transformer_tp2", dataset, "parallel.tensor=2", **w),
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
        # Resharding: further sources, then the loads under other layouts.
        switchall_case(
            "dp2_z1_stop",
            dataset,
            "parallel.zero_stage=1",
            steps=CURVE_STEPS,
            stop_after=SPLIT_AT,
            run_dir="dp2_z1_split",
        ),
        switchall_case(
            "tp2_stop",
            dataset,
            "parallel.tensor=2",
            steps=CURVE_STEPS,
            stop_after=SPLIT_AT,
            run_dir="tp2_split",
        ),
        *(
            reshard_case(name, dataset, single if src == "single" else src, stop, *layout)
            for name, src, stop, layout in RESHARD_TWO
        ),
    ]
    if HAVE_EXPORTS:
        init = f"model.init_from={reference['export_dir']}"
        cases.append(switchall_case("init_from_ep2", dataset, *ep2, init, dump_state=True))
    next(c for c in cases if c["name"] == "ep2_z2")["dump_experts"] = True
    for name in ("ep2_z2", "transformer_z3"):
        next(c for c in cases if c["name"] == name).update(w)
    next(c for c in cases if c["name"] == "ep2_z2_stop")["dump_state"] = True
    return run_cases(2, cases, out, timeout=400), out


@pytest.fixture(scope="session")
def four_ranks(dataset, reference, two_ranks, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("four_ranks")
    w = {"dump_weights_at": WEIGHT_STEPS}
    sources = {
        "single": reference["switchall_stop_dir"],
        "ep2_z2_split": two_ranks[1] / "ep2_z2_split",
        "transformer_z3_split": two_ranks[1] / "transformer_z3_split",
    }
    cases = [
        switchall_case("tp2_dp2_z1", dataset, "parallel.tensor=2", "parallel.zero_stage=1", **w),
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
        switchall_case("ep2_dp4_z1", dataset, "parallel.expert=2", "parallel.zero_stage=1", **w),
        switchall_case(
            "ep2_dp4_z0",
            dataset,
            "parallel.expert=2",
            "optim.grad_clip=0",
            steps=1,
            capture_grads=True,
        ),
        transformer_case(
            "transformer_tp2_dp2_z3", dataset, "parallel.tensor=2", "parallel.zero_stage=3", **w
        ),
        *(
            reshard_case(name, dataset, sources.get(src, src), stop, *layout)
            for name, src, stop, layout in RESHARD_FOUR
        ),
    ]
    next(c for c in cases if c["name"] == "tp2_ep2_dp2_z2").update(w)
    next(c for c in cases if c["name"] == "tp2_ep2_dp2_z2_stop")["dump_state"] = True
    return run_cases(4, cases, out, timeout=400), out


def train_records(history: list[dict]) -> list[dict]:
    return [r for r in history if "loss" in r]
