"""What `switchall pretrain` checks before it creates a process group or builds a model.

Every rank runs the same read-only checks (they see the same config, data and run directory),
so a mistake fails at once, with one line naming the key or file, instead of inside a
collective or after the first `ckpt_every` steps. Global rank 0 then creates the run
directory, checks that it and `checkpoints/` are writable, and takes the run lock; the other
ranks cannot pass the rendezvous without it, so they never start training when it refused.

Resuming (`--resume`, or `--auto-resume` as Slurm jobs do) compares the config with the run's
`config.yaml`: every change is shown; changes of the run's mathematics (model, optimiser,
schedule, batch, seed, precision, data order) are refused unless `--allow-config-change`. A
run whose latest checkpoint is at `train.steps` is finished: nothing is done, exit code 0.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switchall.config import RunConfig
from switchall.configtools import ConfigError, load_yaml, to_dict
from switchall.pretrain.checkpoint import CheckpointManager
from switchall.pretrain.runlock import RunLock

# Keys that may change on resume without changing what is computed: logging, cadence of
# validation and checkpoints, where the (fingerprint-checked) data lives, the process layout.
SAFE_PREFIXES = (
    "logging.",
    "parallel.",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.ckpt_every",
    "train.ckpt_every_minutes",
    "train.keep_checkpoints",
    "train.device",
    "data.path",
    "data.num_workers",
    "data.skip_bad_shards",
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every leaf that differs, sorted by key."""
    a, b = flatten(old), flatten(new)
    missing = object()
    return [
        (k, a.get(k, missing), b.get(k, missing))
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def changes_math(key: str) -> bool:
    return not any(key == p or (p.endswith(".") and key.startswith(p)) for p in SAFE_PREFIXES)


def describe_change(key: str, old: Any, new: Any) -> str:
    def show(v):
        return "(absent)" if not isinstance(v, (str, int, float, bool, list, type(None))) else v

    return f"{key}: {show(old)!r} -> {show(new)!r}"


@dataclass
class StartPlan:
    """What the checks decided; `notes` are printed once, by rank 0."""

    resume: bool
    finished_step: int | None = None
    lock: RunLock | None = None
    notes: list[str] = field(default_factory=list)


def env_rank() -> tuple[int, int]:
    """(global rank, world size) from the launcher's environment (torchrun or our Slurm script)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def check_wandb(cfg: RunConfig) -> None:
    if cfg.logging.wandb != "online" or os.environ.get("WANDB_API_KEY"):
        return
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
        if netrc.netrc(path).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise ConfigError(
        "logging.wandb",
        f"online needs a W&B API key for {host}: set WANDB_API_KEY or run `wandb login`, "
        "or use logging.wandb=offline",
    )


def _probe_writable(directory: Path) -> None:
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ConfigError("", f"{directory} is not writable ({e.strerror or e})") from None


def check_start(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    config_source: str,
    resume: bool = False,
    auto_resume: bool = False,
    allow_config_change: bool = False,
    world_size: int | None = None,
    device_type: str | None = None,
    claim: bool | None = None,
) -> StartPlan:
    """Run the start-up checks of `switchall pretrain` (see the module docstring).

    `world_size` / `device_type` default to this process's launch (environment, devices);
    `switchall launch` passes the job's. `claim` (default: on global rank 0) creates the run
    directory, checks it is writable and takes the run lock.
    """
    from switchall.data_pipeline import DataError, read_manifest
    from switchall.parallel.layout import check_layout
    from switchall.pretrain.runtime import resolve_device

    run_dir = Path(run_dir)
    rank, world = env_rank()
    if device_type is None:
        device_type = resolve_device(cfg.train.device).type
    check_layout(cfg, world_size or world, device_type)
    check_wandb(cfg)
    manifest = read_manifest(cfg.data.path)
    if not manifest.splits.get("val"):
        raise DataError(
            f"{manifest.manifest_url}: the dataset has no validation split, which training "
            "evaluates on; prepare it again with --val INPUT (or a larger --val-fraction)"
        )
    if manifest.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{cfg.model.vocab_size} is smaller than the vocabulary of the dataset "
            f"{cfg.data.path} ({manifest.vocab_size})",
        )
    if resume and not run_dir.is_dir():
        raise ConfigError(
            "", f"--resume: {run_dir} does not exist (drop --resume to start a new run there)"
        )
    plan = StartPlan(resume=resume or auto_resume)
    latest = CheckpointManager(run_dir / "checkpoints").latest()
    if latest is not None and not plan.resume:
        raise ConfigError(
            "", f"{run_dir} already holds checkpoints; pass --resume or a new --run-dir"
        )
    saved_config = run_dir / "config.yaml"
    if plan.resume and saved_config.is_file():
        changes = config_changes(load_yaml(saved_config), to_dict(cfg))
        math = [c for c in changes if changes_math(c[0])]
        if math and not allow_config_change:
            shown = "; ".join(describe_change(*c) for c in math[:6])
            more = f" (and {len(math) - 6} more)" if len(math) > 6 else ""
            raise ConfigError(
                "",
                f"{saved_config} (the run's config) and {config_source} differ in settings "
                f"that change the run's mathematics: {shown}{more}. Resume with {saved_config}, "
                "use a new --run-dir, or pass --allow-config-change",
            )
        plan.notes += [f"config change on resume: {describe_change(*c)}" for c in changes]
    if latest is not None and plan.resume:
        step = CheckpointManager.read_meta(latest)["step"]
        if step >= cfg.train.steps:
            plan.finished_step = step
            return plan
    if resume and latest is None:
        plan.notes.append(
            f"WARNING: --resume, but {run_dir / 'checkpoints'} holds no complete checkpoint: "
            "starting from step 0"
        )
    if claim if claim is not None else rank == 0:
        _probe_writable(run_dir)
        _probe_writable(run_dir / "checkpoints")
        plan.lock = RunLock(run_dir).acquire()
        if plan.lock.took_over:
            holder = plan.lock.took_over
            plan.notes.append(
                f"took over the run lock of a trainer that died "
                f"(host {holder.get('host')} pid {holder.get('pid')})"
            )
    return plan


def print_notes(plan: StartPlan) -> None:
    if env_rank()[0] == 0:
        for note in plan.notes:
            print(note, file=sys.stderr, flush=True)
