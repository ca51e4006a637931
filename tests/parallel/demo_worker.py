"""One torchrun job training the demo-size SwitchAll under several layouts with a routing tape.

Started by `tests/parallel/test_demo_parity.py` as `torchrun ... demo_worker.py SPEC.json`.
Each case runs the real `Trainer` under a `DistributedRuntime` with a `RoutingTape` recording
its routing decisions (written per rank) or replaying the single-process run's. Rank 0 writes
SPEC's `out`/results.json: per case, the layout and the logged history.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import switchall
from switchall.config import load_run_config
from switchall.parallel.runtime import DistributedRuntime
from switchall.pretrain.trainer import Trainer
from tests.parallel.routing_tape import RoutingTape


def run_case(case: dict, out: Path) -> dict:
    cfg = load_run_config(case["config"], case["overrides"])
    runtime = DistributedRuntime(cfg)
    try:
        rows = cfg.train.batch_size // runtime.dp_size
        reference = torch.load(case["replay"], weights_only=True) if "replay" in case else None
        tape = RoutingTape(
            "replay" if reference is not None else "record",
            row_offset=runtime.dp_rank * rows,
            reference=reference,
        )
        with tape.installed():
            trainer = Trainer(cfg, out / case["name"], runtime)
            result = trainer.run()
        if tape.mode == "record":
            tape.save(out / f"{case['name']}_tape_rank{runtime.rank}.pt")
        return {"layout": runtime.layout_name, "history": result["history"]}
    finally:
        runtime.shutdown()


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    dist.init_process_group("gloo")
    results = {"switchall_file": switchall.__file__}
    for case in spec["cases"]:
        results[case["name"]] = run_case(case, out)
        dist.barrier()
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
