"""The batch script `switchall launch slurm` writes: plain bash a user can read, edit, resubmit.

Rank mapping: srun starts one task per rank and each task maps Slurm's ids onto the variables
`torch.distributed` reads (RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE =
SLURM_NTASKS), rendezvous at rank 0 on the allocation's first node. There is no torchrun in
the job: Slurm already starts, places and signals the processes, srun's `--kill-on-bad-exit`
ends every rank as soon as one fails, and signals reach the trainers themselves instead of
an agent that would answer them by killing its workers.
"""

from __future__ import annotations

import shlex
import time

TEMPLATE = """\
#!/bin/bash
# switchall Slurm job, written by `switchall launch slurm` on {date}.
# {shape}
# Edit freely and resubmit with:  sbatch {script}
# Every attempt (first start, requeue, resubmission) continues the run from its latest
# complete checkpoint; an attempt on a finished run exits 0 at once. Exit codes of the
# trainer: 0 finished, 2 configuration/data/checkpoint error (not requeued), 3 stopped by
# a signal after writing a checkpoint (requeued), anything else a failure (requeued).
#
{sbatch_lines}

set -uo pipefail

PYTHON={python}
RUN_DIRS=(
{run_dirs}
)
MAX_REQUEUES={max_requeues}
RUN_DIR=${{RUN_DIRS[${{SLURM_ARRAY_TASK_ID:-0}}]}}
ATTEMPT=${{SLURM_RESTART_COUNT:-0}}
{redirect}export SWITCHALL_LOG_DIR=$RUN_DIR/logs/attempt-$(printf %02d "$ATTEMPT")-job$SLURM_JOB_ID
mkdir -p "$SWITCHALL_LOG_DIR"
# An array task is requeued by its own id (the array's id would requeue every task).
if [ -n "${{SLURM_ARRAY_TASK_ID:-}}" ]; then
  JOB=${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}
else
  JOB=$SLURM_JOB_ID
fi

# Rendezvous: rank 0 listens on the first node of the allocation.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$HEAD_NODE" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export MASTER_ADDR=${{MASTER_ADDR:-$HEAD_NODE}}
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}}

log() {{ echo "[$(date '+%F %T')] switchall job $JOB attempt $ATTEMPT: $*"; }}
log "$SLURM_NNODES nodes ($SLURM_JOB_NODELIST), $SLURM_NTASKS ranks, rendezvous" \\
    "$MASTER_ADDR:$MASTER_PORT, run $RUN_DIR, rank logs $SWITCHALL_LOG_DIR"

# One task per rank; each exports its Slurm ids as torch.distributed's RANK, LOCAL_RANK and
# WORLD_SIZE, then becomes `switchall pretrain` (the same command and loop as a local run).
srun --kill-on-bad-exit=1 bash -c \\
    'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' \\
    rank "$PYTHON" -m switchall pretrain "$RUN_DIR/launch/config.yaml" --run-dir "$RUN_DIR" \\
    --auto-resume{pretrain_flags} &
SRUN=$!

# The warning signal before the time limit (--signal above), `scancel --signal=USR1 --batch`
# and a SIGTERM reach this shell. Each is passed to every rank as SIGUSR1 (srun would answer a
# SIGTERM by killing its tasks): the ranks finish the step they are in, agree on the last one,
# write a checkpoint and exit with code 3.
trap 'log "SIGUSR1: the ranks stop after this step, with a checkpoint"; kill -USR1 $SRUN' USR1
trap 'log "SIGTERM: the ranks stop after this step, with a checkpoint"; kill -USR1 $SRUN' TERM

while :; do
  wait "$SRUN"; rc=$?
  kill -0 "$SRUN" 2>/dev/null || break  # a trap woke us up: srun is still running
done
wait "$SRUN" 2>/dev/null; last=$?
[ "$last" -ne 127 ] && rc=$last  # srun ended while we were in a trap: its real status

case $rc in
  0) log "the run is finished"; exit 0 ;;
  2) log "configuration, data or checkpoint error (see above): not requeued"; exit 2 ;;
  3) why="stopped by a signal after writing a checkpoint (exit code 3)" ;;
  *) why="failed with exit code $rc (rank logs: $SWITCHALL_LOG_DIR)" ;;
esac
if [ "$ATTEMPT" -lt "$MAX_REQUEUES" ]; then
  log "$why: requeueing ($((ATTEMPT + 1)) of at most $MAX_REQUEUES requeues)"
  scontrol requeue "$JOB" && exit "$rc"
  log "scontrol requeue $JOB failed"
else
  log "$why: not requeued (all $MAX_REQUEUES requeues used)"
fi
exit "$rc"
"""


def render(
    *,
    script: str,
    sbatch: list[str],
    python: str,
    run_dirs: list[str],
    max_requeues: int,
    shape: str,
    pretrain_flags: list[str],
    array: bool,
) -> str:
    """The script's text. `sbatch`: option strings, one `#SBATCH` line each."""
    redirect = ""
    if array:
        # One output file per run directory: sbatch's --output cannot name it per task.
        redirect = (
            'mkdir -p "$RUN_DIR/logs"\n'
            'exec >>"$RUN_DIR/logs/slurm-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}.out" 2>&1\n'
        )
    return TEMPLATE.format(
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        shape=shape,
        script=shlex.quote(script),
        sbatch_lines="\n".join(f"#SBATCH {opt}" for opt in sbatch),
        python=shlex.quote(python),
        run_dirs="\n".join(f"  {shlex.quote(d)}" for d in run_dirs),
        max_requeues=int(max_requeues),
        redirect=redirect,
        pretrain_flags="".join(f" {shlex.quote(f)}" for f in pretrain_flags),
    )
