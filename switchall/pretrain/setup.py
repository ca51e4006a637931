"""Run-directory bookkeeping: resolved config, dataset checks, loaders, checkpoint metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from switchall.config import RunConfig, dump_run_config
from switchall.configtools import ConfigError, to_dict
from switchall.pretrain.checkpoint import CheckpointManager
from switchall.pretrain.runlock import LOCK_NAME, RunLock


def _all_ranks_ok(ok: bool, runtime) -> bool:
    """True on every rank iff `ok` on every rank (one all-reduce; also the start barrier)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def data_mode(cfg: RunConfig) -> str:
    """Contiguous lanes whenever the model carries XL memory, shuffled windows otherwise."""
    if cfg.data.mode != "auto":
        return cfg.data.mode
    return "contiguous" if cfg.model.mem_chunks > 0 else "shuffled"


def amp_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


class RunSetup:
    def __init__(self, cfg: RunConfig, run_dir: Path, runtime, resume: bool, write: bool = True):
        """`write=False` (evaluation) leaves the run directory untouched."""
        from switchall.data_pipeline import read_manifest

        self.cfg, self.run_dir, self.runtime = cfg, run_dir, runtime
        self.config_dict = to_dict(cfg)
        self.manifest = read_manifest(cfg.data.path)
        self.tokenizer_sha256 = self.manifest.tokenizer.get("sha256")
        self.byte_level = self.manifest.tokenizer.get("type") == "byte"
        if self.manifest.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                "model.vocab_size",
                f"{cfg.model.vocab_size} is smaller than the vocabulary of the dataset "
                f"{cfg.data.path} ({self.manifest.vocab_size})",
            )
        self.amp_dtype = amp_dtype_for(cfg.train.precision, runtime.device)
        if self.amp_dtype == torch.float16 and runtime.device.type != "cuda":
            raise ConfigError("train.precision", "fp16 needs a CUDA device; use bf16 or fp32")
        self.lock: RunLock | None = None
        if write:
            self._claim_run_dir(resume)

    def _claim_run_dir(self, resume: bool) -> None:
        """Rank 0 checks the directory, takes the run lock (unless `switchall pretrain` took it
        already) and writes config.yaml; every rank learns whether that worked, and the others
        check that they see the same directory (it must be on a filesystem they share)."""
        cfg, run_dir, runtime = self.cfg, self.run_dir, self.runtime
        error: Exception | None = None
        if runtime.is_logging_rank:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                if not resume and CheckpointManager(run_dir / "checkpoints").latest():
                    raise ConfigError(
                        "", f"{run_dir} already holds checkpoints; pass --resume or a new --run-dir"
                    )
                self.lock = RunLock.held_here(run_dir) or RunLock(run_dir).acquire()
                dump_run_config(cfg, run_dir / "config.yaml")
            except Exception as e:
                error = e
        if not _all_ranks_ok(error is None, runtime):
            if error is not None:
                raise error
            raise RuntimeError(f"rank 0 could not set up {run_dir}; see its error")
        visible = runtime.is_logging_rank or (run_dir / LOCK_NAME).exists()
        if not _all_ranks_ok(visible, runtime):
            import socket

            if visible:
                raise RuntimeError(f"a rank does not see {run_dir}; see its error")
            raise ConfigError(
                "",
                f"rank {runtime.rank} on {socket.gethostname()} does not see {run_dir}, which "
                "rank 0 created: the run directory must be on a filesystem all nodes share",
            )

    def release(self) -> None:
        """Release the run lock (the end of the run)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _loader(self, split: str, loop: bool):
        from switchall.data_pipeline import TokenLoader

        c = self.cfg
        return TokenLoader(
            c.data.path,
            split=split,
            global_batch_size=c.train.batch_size,
            seq_len=c.model.seq_len,
            dp_rank=self.runtime.dp_rank,
            dp_size=self.runtime.dp_size,
            seed=c.train.seed,
            mode=data_mode(c),
            loop=loop,
            num_workers=c.data.num_workers,
            skip_bad_shards=c.data.skip_bad_shards,
            expected_tokenizer_sha256=self.tokenizer_sha256,
        )

    def train_loader(self):
        return self._loader("train", loop=True)

    def val_loader(self):
        return self._loader("val", loop=False)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "layout": self.runtime.layout_record(),
            "model": self.config_dict["model"],
            "tokenizer_sha256": self.tokenizer_sha256,
            "config": self.config_dict,
        }

    def check_checkpoint_meta(self, meta: dict[str, Any], path: Path) -> None:
        """A checkpoint resumes into the same model and tokenizer, under any layout.

        `model.init_from` is not compared: it only matters when a run starts."""

        def architecture(model: Any) -> Any:
            return (
                {k: v for k, v in model.items() if k != "init_from"}
                if isinstance(model, dict)
                else model
            )

        if architecture(meta.get("model")) != architecture(self.config_dict["model"]):
            raise ConfigError(
                "model", f"differs from the model of checkpoint {path}; resume with its config"
            )
        if meta.get("tokenizer_sha256") != self.tokenizer_sha256:
            raise ConfigError(
                "data.path",
                f"the tokenizer of {self.cfg.data.path} differs from the one checkpoint {path} "
                "was trained with",
            )
