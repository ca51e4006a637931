"""The training loop: one loop for one process and for every parallel layout.

Legend: B this rank's batch rows (lanes), b micro-batch rows, T chunk length, V vocabulary.

Per step: take this rank's slice of the global batch, split it into `grad_accum` micro-batches,
run each with its own XL memory (one memory per micro-batch lane group, carried across steps and
dropped when the loader starts fresh lanes), add the σ-MoE regularisers to the LM loss, and
let the engine clip and step. Everything a resumed run needs to continue bit-identically is in
the checkpoint: model, optimiser, step, data position, XL memory and RNG states.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from switchall.config import RunConfig
from switchall.models import NoiseContext, build_model
from switchall.models.routing import derive_seed
from switchall.pretrain.checkpoint import CheckpointManager
from switchall.pretrain.evaluate import EvalResult, autocast_for, validate
from switchall.pretrain.metrics import MetricsLogger, format_duration
from switchall.pretrain.runtime import Runtime
from switchall.pretrain.schedule import lr_at
from switchall.pretrain.setup import RunSetup
from switchall.pretrain.speed import apply_speed_options


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, runtime: Runtime, resume: bool = False):
        self.cfg, self.runtime = cfg, runtime
        self.setup = RunSetup(cfg, Path(run_dir), runtime, resume)
        self.run_dir, self.device = self.setup.run_dir, runtime.device
        self.amp_dtype = self.setup.amp_dtype
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        model = build_model(cfg.model).to(self.device)
        self.model = runtime.parallelize(model)
        apply_speed_options(model, cfg.train)  # in place: parallelize kept the LanguageModel
        self.engine = runtime.build_engine(
            self.model, cfg.optim, cfg.train.steps, fp16=self.amp_dtype == torch.float16
        )
        self.loader = self.setup.train_loader()
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints", cfg.train.keep_checkpoints, runtime.rank, runtime.barrier
        )
        self.step = 0
        self.accum = cfg.train.grad_accum
        self.memory: list[list[torch.Tensor] | None] = [None] * self.accum
        self.metrics = MetricsLogger(
            self.run_dir,
            cfg.logging,
            enabled=runtime.is_logging_rank,
            run_config=self.setup.config_dict,
        )
        self.history: list[dict[str, Any]] = []
        if resume:
            self._resume()

    # ----------------------------------------------------------------- checkpoints
    def _rank_file(self, name: str) -> str:
        return f"{name}_rank{self.runtime.rank}.pt"

    def save(self) -> Path:
        state = {
            "step": self.step,
            "engine": self.engine.state_dict(),
            "memory": self.memory,
            "loader": self.loader.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "python": random.getstate(),
            },
        }
        objects = {
            **self.runtime.model_files(self.model),
            self._rank_file("train_state"): state,
        }
        return self.ckpt.save(self.step, objects, self.setup.checkpoint_meta())

    def _resume(self) -> None:
        path = self.ckpt.latest()
        if path is None:
            self.metrics.log({"event": "start", "step": 0}, console="no checkpoint yet; starting")
            return
        self.setup.check_checkpoint_meta(CheckpointManager.read_meta(path), path)
        self.runtime.load_model_files(self.model, lambda name: self.ckpt.load(path, name))
        state = self.ckpt.load(path, self._rank_file("train_state"))
        self.engine.load_state_dict(state["engine"])
        self.loader.load_state_dict(state["loader"])
        self.memory = [
            None if m is None else [t.to(self.device) for t in m] for m in state["memory"]
        ]
        self.step = state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        random.setstate(state["rng"]["python"])
        self.metrics.log({"event": "resume", "step": self.step}, console=f"resumed from {path}")

    # ----------------------------------------------------------------- one step
    def train_step(self, batch_BT1: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        if self.loader.is_lane_start(self.step):
            self.memory = [None] * self.accum
        micro = batch_BT1.to(self.device, non_blocking=True).chunk(self.accum)
        noise_seed = derive_seed(cfg.train.seed, self.step)
        rows = batch_BT1.shape[0] // self.accum
        lm_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for i, mb_bT1 in enumerate(micro):
            inp_bT, tgt_bT = mb_bT1[:, :-1], mb_bT1[:, 1:]
            noise = NoiseContext(noise_seed, self.runtime.dp_rank * batch_BT1.shape[0] + i * rows)
            with autocast_for(self.device, self.amp_dtype):
                out = self.model(inp_bT, self.memory[i], noise=noise)
            lm = F.cross_entropy(out.logits_BTV.float().flatten(0, 1), tgt_bT.flatten())
            self.engine.backward((lm + out.aux_loss) / self.accum)
            self.memory[i] = out.memory
            lm_sum += lm.detach()
            aux_sum += out.aux_loss.detach()
        grad_norm = self.engine.step(self.step)
        stats = torch.stack([lm_sum, aux_sum]) / self.accum
        stats = self.runtime.all_reduce_sum(stats) / self.runtime.dp_size
        return {"loss": float(stats[0]), "aux_loss": float(stats[1]), "grad_norm": grad_norm}

    def evaluate(self) -> EvalResult:
        result = validate(
            self.model,
            self.setup.val_loader(),
            self.cfg.model,
            self.device,
            self.amp_dtype,
            self.cfg.train.eval_batches,
            self.runtime.all_reduce_sum,
            self.setup.byte_level,
        )
        self.metrics.log(
            result.record(self.step), console=f"step {self.step:>6} | {result.describe()}"
        )
        self.history.append(result.record(self.step))
        return result

    # ----------------------------------------------------------------- the loop
    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to `train.steps`, validating and checkpointing on the way.

        `stop_after`: return early, with a checkpoint, once this many steps have been taken
        in this call, as a job that runs out of its time slot does; `--resume` continues.
        """
        t = self.cfg.train
        total = t.steps
        tokens_per_step = t.batch_size * self.cfg.model.seq_len
        if self.step == 0 or t.eval_every:
            self.evaluate()
        data_iter = iter(self.loader)
        window_start, window_steps = time.perf_counter(), 0
        run_start, start_step = time.perf_counter(), self.step
        while self.step < total:
            stats = self.train_step(next(data_iter))
            self.step += 1
            window_steps += 1
            if self.step % t.log_every == 0 or self.step == total:
                now = time.perf_counter()
                step_time = (now - window_start) / window_steps
                eta = (total - self.step) * (now - run_start) / (self.step - start_step)
                record = {
                    "step": self.step,
                    **stats,
                    "lr": self._lr(self.step - 1),
                    "tokens_per_s": tokens_per_step / step_time,
                    "step_time": step_time,
                }
                self.history.append(record)
                self.metrics.log(
                    record,
                    console=(
                        f"step {self.step:>6}/{total} | loss {stats['loss']:.4f} | "
                        f"lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s | "
                        f"ETA {format_duration(eta)}"
                    ),
                )
                window_start, window_steps = time.perf_counter(), 0
            if t.eval_every and self.step % t.eval_every == 0 and self.step < total:
                self.evaluate()
            if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < total:
                self.save()
            if (
                stop_after is not None
                and self.step - start_step >= stop_after
                and self.step < total
            ):
                if not (t.ckpt_every and self.step % t.ckpt_every == 0):
                    self.save()
                self.metrics.close()
                return {"step": self.step, "stopped": True, "history": self.history}
        final = self.evaluate()
        self.save()
        self.metrics.close()
        return {
            "step": self.step,
            "val_loss": final.loss,
            "val_ppl": final.ppl,
            "history": self.history,
        }

    def _lr(self, step: int) -> float:
        return lr_at(step, self.cfg.optim, self.cfg.train.steps)
