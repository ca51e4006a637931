"""Hand-picked mutation check: break the code on purpose, one mutation at a time, and see that
the tests named for it fail. A developer runs it (not CI: it takes 15-30 minutes on 2 cores):

    .venv/bin/python tools/mutants.py                 # every mutant, summary per module
    .venv/bin/python tools/mutants.py --only S1 O1    # some of them
    .venv/bin/python tools/mutants.py --list          # what they are
    .venv/bin/python tools/mutants.py --markdown      # the table TESTING.md records

The repository is copied to a temporary directory (without .venv, .git, runs/ and data/);
each mutation edits one file of the copy, runs its tests there with PYTHONPATH at the copy
(so every subprocess the tests start imports the mutated code too), and restores the file.
A mutant is *killed* when the tests fail, *survived* when they pass. First the union of all
selected tests runs once on the unmutated copy: it must pass, or no result means anything.

A mutation names the exact text it replaces; text that no longer occurs exactly once is
reported as *stale* (the code moved on: update the mutation). `--whole-files` runs the test
files instead of the named tests; with it, a mutant whose files do not exist is *untested*.
Under load, OMP_NUM_THREADS=1 makes the tiny models of the tests several times faster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL_SKIP = {".venv", ".git", "runs", "data", ".pytest_cache", "switchall.egg-info"}


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    what: str
    find: str | tuple[str, ...]  # several strings for a mutation of several places
    replace: str | tuple[str, ...]
    tests: tuple[str, ...]

    def edits(self) -> list[tuple[str, str]]:
        if isinstance(self.find, str):
            return [(self.find, self.replace)]
        return list(zip(self.find, self.replace, strict=True))

    @property
    def module(self) -> str:
        return self.path.removeprefix("switchall/").removesuffix(".py")


T = "tests/pretrain/test_training.py"
EV = "tests/pretrain/test_evaluate.py"
CK = "tests/pretrain/test_checkpoint.py"
LD = "tests/data/test_loader.py"
BAD = "tests/data/test_bad_input.py"
HTTP = "tests/data/test_http.py"
PREP = "tests/data/test_prepare.py"
SCHED = "tests/pretrain/test_schedule.py"
MOD = "tests/models/test_modules.py"
LM = "tests/models/test_lm.py"
KERN = "tests/kernels/test_cvmm_kernels.py"
API = "tests/kernels/test_cvmm_api.py"
SCHEDK = "tests/kernels/test_cvmm_schedule.py"
PARITY = "tests/parallel/test_parity.py"
CPU = "tests/kernels/test_cvmm_cpu.py"
CKP = "tests/parallel/test_checkpoints.py"
TS = "switchall/checkpoint/training_state.py"
DENSE = "switchall/kernels/cvmm_torch_dense.py"

# A table: one mutant per entry, its id, file and purpose on one line.
# fmt: off
MUTANTS = [
    # ------------------------------------------------------------------ trainer resume
    Mutant(
        "M1", "switchall/pretrain/trainer.py", "resume ignores the checkpoint (restarts at 0)",
        "path = self.ckpt.select_resume()", "path = None",
        (f"{T}::test_resume_gives_identical_losses",),
    ),
    Mutant(
        "M2", TS, "resume does not restore the data position",
        'trainer.loader.load_state_dict(state["loader"])', "pass",
        (f"{T}::test_resume_gives_identical_losses",),
    ),
    Mutant(
        "M3", TS, "resume does not restore the torch RNG",
        'torch.set_rng_state(_unb64(state["torch"]))', "pass",
        (f"{T}::test_resume_gives_identical_losses",),
    ),
    Mutant(
        "M4", TS, "resume drops the XL memory",
        "trainer.memory = memory if memory is not None else [None] * trainer.accum",
        "trainer.memory = [None] * trainer.accum",
        (f"{T}::test_resume_gives_identical_losses",),
    ),
    Mutant(
        "M5", TS, "resume does not restore the optimiser (no AdamW entries loaded)",
        'entries = engine.checkpoint_entries(optimizer=state["optimizer"], for_load=True)',
        "entries = engine.checkpoint_entries(optimizer=False, for_load=True)",
        (f"{T}::test_resume_gives_identical_losses",),
    ),
    Mutant(
        "M6", "switchall/pretrain/trainer.py", "train.keep_checkpoints not passed (default 2)",
        'self.run_dir / "checkpoints", cfg.train.keep_checkpoints,',
        'self.run_dir / "checkpoints", 2,',
        (f"{T}::test_short_run_lowers_validation_loss",),
    ),
    Mutant(
        "M7", "switchall/pretrain/trainer.py", "resume ignores the checkpoint (kill test only)",
        "path = self.ckpt.select_resume()", "path = None",
        (f"{T}::test_sigkilled_pretrain_resumes_with_identical_losses",),
    ),
    # ------------------------------------------------------------------ checkpoints
    Mutant(
        "C1", "switchall/pretrain/checkpoint.py", "verify skips the sha256 check",
        'if sha256_file(path) != entry.get("sha256"):', "if False:",
        (f"{CK}::test_a_bad_latest_checkpoint_falls_back_loudly",),
    ),
    Mutant(
        "C2", "switchall/pretrain/checkpoint.py", "prune ignores `keep` (keeps 2)",
        "self._prune(self.keep - 1)", "self._prune(1)",
        (f"{T}::test_short_run_lowers_validation_loss",),
    ),
    Mutant(
        "C3", "switchall/pretrain/checkpoint.py", "a killed save's temporary is never removed",
        'if p.name.startswith((".tmp-step_", ".trash-")):', "if False:",
        (CK,),
    ),
    Mutant(
        "C4", "switchall/fileio.py", "writes in place instead of to a temporary + rename",
        'tmp = path.with_name(path.name + ".tmp")', "tmp = path",
        (CK,),
    ),
    Mutant(
        "C5", "switchall/pretrain/checkpoint.py", "saved in place, not in a renamed temporary",
        (
            'tmp = self.root / f".tmp-step_{step:08d}"',
            "                if final.exists():  # a corrupt one skipped at resume, now "
            "superseded\n                    self._trash(final)\n"
            "                os.replace(tmp, final)",
        ),
        ("tmp = final", "                pass"),
        (CK,),
    ),
    Mutant(
        "C6", "switchall/pretrain/checkpoint.py", "a step directory without meta.json counts",
        'if m and (p / "meta.json").is_file():', "if m:",
        (f"{CK}::test_save_verify_prune",),
    ),
    Mutant(
        "C7", "switchall/checkpoint/boxes.py", "flat-range boxes: the partial last row one row up",
        "out += [((full_end, *o), (1, *s)) for o, s in _boxes(shape[1:], 0, hi % row)]",
        "out += [((full_end - 1, *o), (1, *s)) for o, s in _boxes(shape[1:], 0, hi % row)]",
        (
            f"{CK}::test_flat_ranges_become_few_contiguous_boxes",
            f"{CK}::test_dcp_reshards_between_flat_partitions_and_row_blocks",
        ),
    ),
    # ------------------------------------------------------------------ loader order
    Mutant(
        "O1", "switchall/data_pipeline/order.py", "shuffle-block permutation is the identity",
        "return keyed_permutation(size, seed, epoch, 0x424C, block)", "return np.arange(size)",
        (LD,),
    ),
    Mutant(
        "O2", "switchall/data_pipeline/order.py", "shard order is the identity every epoch",
        "order_S = keyed_permutation(len(counts_S), seed, epoch, 0x5348)",
        "order_S = np.arange(len(counts_S))",
        (LD,),
    ),
    Mutant(
        "O3", "switchall/data_pipeline/order.py", "block permutation ignores the epoch",
        "_cached_perm(size, self.seed, epoch, block)", "_cached_perm(size, self.seed, 0, block)",
        (LD,),
    ),
    Mutant(
        "O4", "switchall/data_pipeline/order.py", "contiguous lanes advance by T + 1",
        "lanes_B * self.lane_tokens + g * T", "lanes_B * self.lane_tokens + g * (T + 1)",
        (LD,),
    ),
    Mutant(
        "O5", "switchall/data_pipeline/assembler.py", "a skipped shard is replaced by zeros",
        "tokens = np.resize(alt_tokens, self.shards[sid].tokens)",
        "tokens = np.zeros(self.shards[sid].tokens, dtype=alt_tokens.dtype)",
        (f"{BAD}::test_skipping_bad_shards_keeps_everything_else_in_place",),
    ),
    # ------------------------------------------------------------------ data preparation
    Mutant(
        "P1", "switchall/data_pipeline/tokenizer.py", "digits not split",
        "split_digits=True,", "split_digits=False,",
        (f"{PREP}::test_sentencepiece_round_trip",),
    ),
    Mutant(
        "P2", "switchall/data_pipeline/corpus.py", "fractional weight takes a quarter",
        "(weight - whole) * 2.0**64", "(weight - whole) * 2.0**63",
        (f"{PREP}::test_jsonl_weights_and_text_field",),
    ),
    Mutant(
        "P3", "switchall/data_pipeline/corpus.py", "sampling hash ignores the pass",
        'return _u64(f"{pass_index}:{key}") <', 'return _u64(f"{key}") <',
        (f"{PREP}::test_jsonl_weights_and_text_field",),
    ),
    Mutant(
        "R1", "switchall/data_pipeline/manifest.py", "one HTTP retry fewer",
        "attempts = 1 if is_local(url) else 1 + max(0, retries)\n    reason",
        "attempts = 1 if is_local(url) else max(1, retries)\n    reason",
        (f"{HTTP}::test_retry_count_and_backoff",),
    ),
    Mutant(
        "R2", "switchall/data_pipeline/manifest.py", "constant instead of exponential backoff",
        "            time.sleep(retry_delay * 2 ** (attempt - 1))\n            log.warning(",
        "            time.sleep(retry_delay)\n            log.warning(",
        (f"{HTTP}::test_retry_count_and_backoff",),
    ),
    # ------------------------------------------------------------------ schedule
    Mutant(
        "S1", "switchall/pretrain/schedule.py", "optim.cosine_steps ignored",
        "span = cfg.cosine_steps if cfg.cosine_steps is not None else total_steps",
        "span = total_steps",
        (SCHED,),
    ),
    Mutant(
        "S2", "switchall/pretrain/schedule.py", "not held at min_lr after the cosine",
        "t = min(step - cfg.warmup_steps, max(span, 1)) / max(span, 1)",
        "t = (step - cfg.warmup_steps) / max(span, 1)",
        (SCHED,),
    ),
    Mutant(
        "S3", "switchall/pretrain/schedule.py", "warmup off by one step",
        "cfg.lr * (step + 1) / cfg.warmup_steps", "cfg.lr * step / cfg.warmup_steps",
        (SCHED,),
    ),
    # ------------------------------------------------------------------ evaluation and CLI
    Mutant(
        "E1", "switchall/pretrain/cli.py", "evaluate covers train.eval_batches only",
        "args.batches or 0,", "args.batches or cfg.train.eval_batches,",
        (EV,),
    ),
    Mutant(
        "E2", "switchall/pretrain/evaluate.py", "bits per character in log10",
        "return self.loss / math.log(2.0)", "return self.loss / math.log(10.0)",
        (EV,),
    ),
    Mutant(
        "E3", "switchall/pretrain/evaluate.py", "validation does not carry XL memory",
        "        memory = out.memory\n        nll +=", "        memory = None\n        nll +=",
        (EV,),
    ),
    Mutant(
        "E4", "switchall/pretrain/setup.py", "checkpoint tokenizer not compared",
        'if meta.get("tokenizer_sha256") != self.tokenizer_sha256:', "if False:",
        (f"{T}::test_checkpoint_refuses_a_dataset_of_another_tokenizer",),
    ),
    Mutant(
        "E5", "switchall/cli.py", "data errors are not exit code 2",
        "return (ConfigError, DataError, CheckpointError, RunLockedError)",
        "return (ConfigError, CheckpointError, RunLockedError)",
        (f"{EV}::test_data_errors_exit_2_naming_the_shard",),
    ),
    Mutant(
        "E6", "switchall/pretrain/cli.py", "train.deterministic not applied",
        "torch.use_deterministic_algorithms(True)", "pass",
        (f"{T}::test_deterministic_reaches_the_cvmm_calls",),
    ),
    Mutant(
        "A1", "switchall/analysis/accounting.py", "tables' routing term without the factor C",
        "routing = n_sel * a.n_experts * d * t * c", "routing = n_sel * a.n_experts * d * t",
        ("tests/test_accounting.py",),
    ),
    # ------------------------------------------------------------------ routing
    Mutant(
        "RT1", "switchall/models/routing.py", "softmax gates instead of sigmoid",
        "gates_XK = torch.sigmoid(logits_XE).gather(-1, idx_XK)",
        "gates_XK = torch.softmax(logits_XE, -1).gather(-1, idx_XK)",
        (MOD, LM),
    ),
    Mutant(
        "RT2", "switchall/models/routing.py", "dropped experts still chosen",
        'logits_XE.masked_fill(drop_XE, float("-inf"))', "logits_XE",
        (MOD,),
    ),
    Mutant(
        "RT3", "switchall/models/routing.py", "top-k picks the smallest scores",
        "idx_XK = choice_XE.topk(k, dim=-1, sorted=False).indices",
        "idx_XK = choice_XE.topk(k, dim=-1, largest=False, sorted=False).indices",
        (MOD, LM),
    ),
    Mutant(
        "RT4", "switchall/models/routing.py", "dropout draws ignore the global row offset",
        "row_X = row_X + noise.row_offset * rows_per_batch_row", "row_X = row_X",
        (MOD,),
    ),
    # ------------------------------------------------------------------ cvmm, torch path
    # Three CPU paths (cvmm_torch.py): the sorted one (gemm "loop" and "grouped_mm" share its
    # gating code) and every expert densely (cvmm_torch_dense.py), as "expand" (V, per-slot
    # outputs) or "combine" (O, slots summed per output row): a, b, c. KERN runs the backend
    # under gemm="auto", which takes each of them for some of its cases (fp32: dense where the
    # FLOP factor is <= 2, else grouped_mm or loop; 16-bit: sorted); CPU forces each in turn.
    Mutant(
        "CT1a", "switchall/kernels/cvmm_torch.py", "forward ignores the gates (sorted)",
        "_slot_sum(y_MO.to(acc), inverse_M, num_out_rows, gates_M)",
        "_slot_sum(y_MO.to(acc), inverse_M, num_out_rows, None)",
        (KERN, f"{CPU}::test_both_paths_match_reference_fp32"),
    ),
    Mutant(
        "CT1b", DENSE, "forward ignores the gates (dense expand)",
        "psw = gates_M.reshape(num_out_rows, slots).to(y.dtype)", "psw = None",
        (KERN, f"{CPU}::test_both_paths_match_reference_fp32"),
    ),
    Mutant(
        "CT1c", DENSE, "forward ignores the gates (dense combine)",
        "a, _ = _combined_inputs(x_rows, ids_M, gates_M, k, num_out_rows, e)",
        "a, _ = _combined_inputs(x_rows, ids_M, torch.ones_like(gates_M), k, num_out_rows, e)",
        (KERN, f"{CPU}::test_both_paths_match_reference_fp32"),
    ),
    Mutant(
        "CT2a", "switchall/kernels/cvmm_torch.py", "input gradient misses the gate (sorted)",
        "_slot_sum(t_MI, inverse_M, x_rows.shape[0], gates_M)",
        "_slot_sum(t_MI, inverse_M, x_rows.shape[0], None)",
        (KERN, f"{CPU}::test_both_paths_match_reference_fp32"),
    ),
    Mutant(
        "CT2b", DENSE, "input gradient misses the gate (dense expand)",
        "            grad_x = dy @ w_IF.t()",
        "            grad_x = go_MO.new_zeros(dy.shape[0] * e, o).index_add_(0, row_M, go_MO)"
        ".view(dy.shape) @ w_IF.t()",
        (KERN, f"{CPU}::test_both_paths_match_reference_fp32"),
    ),
    Mutant(
        "CT2c", DENSE, "input gradient misses the gate (dense combine)",
        "psw = gates_M.reshape(-1, k).to(da.dtype)", "psw = None",
        (KERN, f"{CPU}::test_both_paths_match_reference_fp32"),
    ),
    Mutant(
        "CT3a", "switchall/kernels/cvmm_torch.py", "weight gradient misses the gate (sorted)",
        "go_MO = (go_MO.to(acc) * g_M1).to(go_MO.dtype)", "go_MO = go_MO",
        (KERN, f"{CPU}::test_both_paths_match_reference_fp32"),
    ),
    Mutant(
        "CT3b", DENSE, "weight gradient misses the gate (dense expand)",
        "grad_w = (x_rows.t() @ dy)",
        "grad_w = (x_rows.t() @ go_MO.new_zeros(dy.shape[0] * e, o).index_add_(0, row_M, go_MO)"
        ".view(dy.shape))",
        (KERN, f"{CPU}::test_both_paths_match_reference_fp32"),
    ),
    Mutant(
        "CT3c", DENSE, "weight gradient misses the gate (dense combine)",
        "a, target_M = _combined_inputs(x_rows, ids_M, gates_M, k, num_out_rows, e)",
        "a, target_M = _combined_inputs(x_rows, ids_M, torch.ones_like(gates_M), k, "
        "num_out_rows, e)",
        (KERN, f"{CPU}::test_both_paths_match_reference_fp32"),
    ),
    Mutant(
        "CT4", "switchall/kernels/cvmm_torch.py", "gate gradient averaged, not summed",
        "dots_M = (t_MI * x_MI.to(acc)).sum(-1)", "dots_M = (t_MI * x_MI.to(acc)).mean(-1)",
        (KERN,),
    ),
    # ------------------------------------------------------------------ cvmm, triton path
    Mutant(
        "TR1", "switchall/kernels/cvmm_triton.py", "allow_tf32 does not reach the weight grad",
        "            deterministic=deterministic,\n            allow_tf32=allow_tf32,\n"
        "        )  # fmt: skip\n    return grad_x, grad_w, grad_g",
        "            deterministic=deterministic,\n"
        "        )  # fmt: skip\n    return grad_x, grad_w, grad_g",
        (f"{API}::test_allow_tf32_is_a_per_call_argument",),
    ),
    Mutant(
        "TR2", "switchall/kernels/cvmm_triton.py", "a per-slot [M, width] buffer (torch.full)",
        "        acc = torch.zeros(num_out_rows, width, dtype=torch.float32, device=a.device)",
        "        torch.full((order_M.numel(), width), 0.0, device=a.device)\n"
        "        acc = torch.zeros(num_out_rows, width, dtype=torch.float32, device=a.device)",
        (f"{SCHEDK}::test_gated_path_never_allocates_per_slot_rows",),
    ),
    Mutant(
        # The inductor test's gated matmul (σ-MoE W2: 4 experts, 2 slots per output row) takes
        # the dense combine path under gemm="auto" (FLOP factor 2).
        "CT5", DENSE, "weight gradient misses the gate (dense combine, compiled)",
        "a, target_M = _combined_inputs(x_rows, ids_M, gates_M, k, num_out_rows, e)",
        "a, target_M = _combined_inputs(x_rows, ids_M, torch.ones_like(gates_M), k, "
        "num_out_rows, e)",
        ("tests/kernels/test_cvmm_compile.py::test_inductor_compiles_around_the_op",),
    ),
    # ------------------------------------------------------------------ data preparation, kill
    Mutant(
        "P4", "switchall/data_pipeline/prepare.py", "prepare records no progress until the end",
        "                save_state(out, state, writers, result.index + 1)", "                pass",
        (f"{PREP}::test_killed_prepare_resumes",),
    ),
    # ------------------------------------------------------------------ parallel (slow)
    Mutant(
        "D1", "switchall/models/lm.py", "residual and embedding dropout always off",
        (
            "        self.drop = nn.Dropout(cfg.dropout)\n\n    def forward(",
            "        self.drop = nn.Dropout(cfg.dropout)\n        self.activation_checkpointing",
        ),
        (
            "        self.drop = nn.Dropout(0.0)\n\n    def forward(",
            "        self.drop = nn.Dropout(0.0)\n        self.activation_checkpointing",
        ),
        (
            f"{LM}::test_dropout_sites_and_rate",
            "tests/parallel/test_units.py::test_replicated_parameters_stay_identical_with_dropout",
        ),
    ),
    Mutant(
        "H1", "tests/parallel/worker.py", "(harness) rank 0 reports no gradient for mlp.w1",
        "            if p.grad is not None\n        }",
        '            if p.grad is not None\n            and not (runtime.rank == 0 and "mlp.w1" in '
        "names[id(p)])\n        }",
        (f"{PARITY}::test_expert_gradients_are_reduced_over_expert_data_parallel_group_only",),
    ),
    Mutant(
        "Z1", "switchall/parallel/deepspeed_engine.py", "no gradient clipping at ZeRO 1-3",
        '"gradient_clipping": optim.grad_clip if stage > 0 else 0.0,',
        '"gradient_clipping": 0.0,',
        (f"{PARITY}::test_two_rank_layouts_match_one_process",),
    ),
    Mutant(
        "C8", "switchall/parallel/expert_parallel.py",
        "EP experts saved under the mirrored rank's global index",
        "mark_shard(local, 0, e0, moe.num_experts)",
        "mark_shard(local, 0, moe.num_experts - per_rank - e0, moe.num_experts)",
        (
            f"{CKP}::test_resume_in_one_process[ep2_z2_split-ep2_to_ep1]",
            f"{CKP}::test_every_expert_saved_once_and_back_as_the_same_expert",
        ),
    ),
    Mutant(
        "C9", "switchall/parallel/zero_state.py", "ZeRO-1/2 load skips the AdamW moments",
        "if mapping is None:  # no fragment of this parameter in this rank's partition",
        "if mapping is None or for_load:  # no fragment of this parameter in this rank's "
        "partition",
        (f"{CKP}::test_resume_under_another_layout[two_ranks-z1_to_z2-dp2_z1_split-10]",),
    ),
    # ------------------------------------------------------------------ launch, sweep (slow)
    Mutant(
        "L1", "switchall/pretrain/control.py", "the stop flag is not agreed across ranks",
        "torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)", "pass",
        (
            "tests/launch/test_torchrun.py::"
            "test_two_nodes_agree_on_the_stop_step_and_a_raising_rank_ends_the_job",
        ),
    ),
    Mutant(
        "W1", "switchall/sweep/runner.py", "sweep run re-runs a finished point",
        'elif s == "done":', "elif False:",
        ("tests/scaling/test_sweep.py::test_sweep_is_killed_resumes_and_reports_failures",),
    ),
]
# fmt: on


def copy_repo(dest: Path) -> Path:
    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__"}
        if Path(directory).resolve() == REPO:
            skip |= TOP_LEVEL_SKIP & set(names)
        return skip

    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)
    return dest


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
    env = {**os.environ, "PYTHONPATH": str(copy)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rfE", *tests]
    try:
        proc = subprocess.run(
            cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        return None, str(e.stdout or "")[-3000:]
    return proc.returncode, proc.stdout + proc.stderr


def first_failure(output: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return m.group(1) if m else ""


def apply(copy: Path, mutant: Mutant) -> str | None:
    """Write the mutated file; returns its original text, or None if the mutation is stale."""
    path = copy / mutant.path
    original = text = path.read_text()
    for find, replace in mutant.edits():
        if text.count(find) != 1:
            return None
        text = text.replace(find, replace)
    path.write_text(text)
    return original


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="*", help="mutant ids")
    p.add_argument("--skip", nargs="*", default=[], help="mutant ids to leave out (e.g. Z1)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    p.add_argument("--markdown", action="store_true", help="print the results as a table")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument(
        "--whole-files",
        action="store_true",
        help="run the whole test files the mutants name (those that exist), not the named "
        "tests: e.g. against an older checkout, to see whether its suite caught them at all",
    )
    args = p.parse_args(argv)

    chosen = [m for m in MUTANTS if (not args.only or m.id in args.only) and m.id not in args.skip]
    if args.list:
        for m in chosen:
            print(f"{m.id:4} {m.path:42} {m.what}  [{' '.join(m.tests)}]")
        return 0

    def selection(m: Mutant) -> tuple[str, ...]:
        if not args.whole_files:
            return m.tests
        files = dict.fromkeys(t.split("::")[0] for t in m.tests)
        return tuple(f for f in files if (REPO / f).is_file())

    results = []
    with tempfile.TemporaryDirectory(prefix="switchall-mutants-") as tmp:
        copy = copy_repo(Path(tmp) / "repo")
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in selection(m)))
            code, output = run_tests(copy, tests, args.timeout)
            if code != 0:
                print(f"the unmutated tests fail (exit {code}); fix that first:\n{output[-3000:]}")
                return 1
            print(f"baseline: {len(tests)} test selections pass on the unmutated copy", flush=True)
        for m in chosen:
            original = apply(copy, m)
            reason = ""
            if original is None:
                status, failed, seconds = "stale", "", 0.0
            elif not selection(m):
                (copy / m.path).write_text(original)
                status, failed, seconds = "untested", "(no such test file)", 0.0
            else:
                start = time.monotonic()
                try:
                    code, output = run_tests(copy, selection(m), args.timeout)
                finally:
                    (copy / m.path).write_text(original)
                seconds = time.monotonic() - start
                status = "survived" if code == 0 else "killed"
                failed = "timeout" if code is None else first_failure(output)
                reason = next((line for line in output.splitlines() if line.startswith("E   ")), "")
                if code == 5:
                    status, failed = "error", "no tests collected"
            results.append({"id": m.id, "path": m.path, "what": m.what, "tests": m.tests,
                            "module": m.module, "status": status,
                            "caught_by": failed, "seconds": round(seconds, 1)})  # fmt: skip
            results[-1]["reason"] = reason.strip()[:300]
            print(f"{m.id:4} {status:8} {seconds:6.1f}s  {m.what}  {failed}", flush=True)
            if reason:
                print(f"     {reason.strip()[:200]}", flush=True)
    modules: dict[str, dict[str, int]] = {}
    for r in results:
        modules.setdefault(r["module"], {}).setdefault(r["status"], 0)
        modules[r["module"]][r["status"]] += 1
    print("\nper module:")
    for module, counts in modules.items():
        print(f"  {module:32} " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if args.markdown:
        print("\n| id | module | mutation | result | first failing test |\n|---|---|---|---|---|")
        for r in results:
            print(f"| {r['id']} | {r['module']} | {r['what']} | {r['status']} | "
                  f"`{r['caught_by']}` |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r["status"] == "killed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
