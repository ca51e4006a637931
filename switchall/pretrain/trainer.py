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

from switchall.checkpoint import training_state
from switchall.checkpoint.init_from import load_init_from
from switchall.config import RunConfig
from switchall.models import NoiseContext, build_model
from switchall.models.routing import derive_seed
from switchall.pretrain.checkpoint import CheckpointManager
from switchall.pretrain.control import RunControl
from switchall.pretrain.evaluate import EvalResult, autocast_for, validate
from switchall.pretrain.metrics import MetricsLogger, format_duration
from switchall.pretrain.run_metrics import RunMetrics
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
        self.run_metrics = RunMetrics(cfg, model, runtime, step_of=lambda: self.step)
        self.model = runtime.parallelize(model)
        apply_speed_options(model, cfg.train)  # in place: parallelize kept the LanguageModel
        self.engine = runtime.build_engine(
            self.model, cfg.optim, cfg.train.steps, fp16=self.amp_dtype == torch.float16
        )
        self.loader = self.setup.train_loader()
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints", cfg.train.keep_checkpoints, comm=runtime
        )
        self.ckpt.start()  # writable? temporaries and trash of a killed run removed
        self._saved_step: int | None = None
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
        self.resumed = resume
        if resume:
            self._resume()
        if cfg.model.init_from and self._saved_step is None:  # a new run, not a resumed one
            self.metrics.log(load_init_from(self), console=f"weights from {cfg.model.init_from}")

    # ----------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Checkpoint the current step (collective); a step already on disk is not re-saved."""
        if self._saved_step == self.step:
            return self.ckpt.root / f"step_{self.step:08d}"
        path = training_state.save(self)
        self._saved_step = self.step
        return path

    def _resume(self) -> None:
        path = self.ckpt.select_resume()
        for skipped, why in self.ckpt.skipped:
            self.metrics.log(
                {"event": "checkpoint_skipped", "checkpoint": str(skipped), "reason": why}
            )
        if path is None:
            self.metrics.log({"event": "start", "step": 0}, console="no checkpoint yet; starting")
            return
        meta = CheckpointManager.read_meta(path)
        self.setup.check_checkpoint_meta(meta, path)
        loaded = training_state.restore(self, path, meta)
        self._saved_step = self.step
        saved = meta["layout"]["name"]
        note = "" if loaded["rng"] == "restored" else f" (saved as {saved}; RNG streams reseeded)"
        self.metrics.log(
            {"event": "resume", "step": self.step, "from_layout": saved, **loaded},
            console=f"resumed from {path}{note}",
        )

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
        A stop signal and `train.ckpt_every_minutes` act through `RunControl` (see `control`).
        A run resumed at its last step returns at once: nothing is evaluated or saved again.
        """
        self.metrics.rewind(self.step)  # records past the resumed step are written again
        if self.resumed and self.step >= self.cfg.train.steps and self.ckpt.latest():
            self.close()
            return {"step": self.step, "already_finished": True, "history": self.history}
        control = RunControl(self.device, self.cfg.train.ckpt_every_minutes)
        try:
            return self._run(control, stop_after)
        finally:
            control.close()
            self.close()

    def close(self) -> None:
        """Flush the metrics and release the run directory (the end of a run)."""
        self.metrics.close()
        self.setup.release()

    def _checkpoint(self, control: RunControl) -> None:
        control.saved(self.step, self.save())

    def _run(self, control: RunControl, stop_after: int | None) -> dict[str, Any]:
        t = self.cfg.train
        total = t.steps
        tokens_per_step = t.batch_size * self.cfg.model.seq_len
        if self.step == 0:  # a resumed run validated this step before its checkpoint
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
                record.update(self.run_metrics.at_log(self.step, record["tokens_per_s"]))
                self.history.append(record)
                self.metrics.log(
                    record,
                    console=(
                        f"step {self.step:>6}/{total} | loss {stats['loss']:.4f} | "
                        f"lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s | "
                        f"ETA {format_duration(eta)}" + RunMetrics.describe(record)
                    ),
                )
                window_start, window_steps = time.perf_counter(), 0
            if t.eval_every and self.step % t.eval_every == 0 and self.step < total:
                self.evaluate()
            if self.step == total:
                break  # the final validation and checkpoint follow
            if t.ckpt_every and self.step % t.ckpt_every == 0:
                self._checkpoint(control)
            save, stop = control.after_step()  # agreed by all ranks
            stop = stop or (stop_after is not None and self.step - start_step >= stop_after)
            if (save or stop) and control.saved_step != self.step:
                self._checkpoint(control)
            if stop:
                return {
                    "step": self.step,
                    "stopped": True,
                    "signal": control.stop_signal,
                    "checkpoint": str(control.saved_path),
                    "history": self.history,
                }
        final = self.evaluate()
        self._checkpoint(control)
        return {
            "step": self.step,
            "val_loss": final.loss,
            "val_ppl": final.ppl,
            "history": self.history,
        }

    def _lr(self, step: int) -> float:
        return lr_at(step, self.cfg.optim, self.cfg.train.steps)
