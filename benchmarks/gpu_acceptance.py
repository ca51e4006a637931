"""One command that validates switchall on a GPU and writes one markdown report.

    python benchmarks/gpu_acceptance.py                    # on one H100 / H200: <= 8 minutes
    python benchmarks/gpu_acceptance.py --smoke --out r.md # CPU, tiny: what CI runs

Sections, each with its own time budget (seconds, `--budget SECTION=S` to change):
1. kernel_tests (120): `pytest tests/kernels/test_cvmm_gpu.py`: the compiled Triton kernels
   against the torch backend at paper shapes, deterministic mode, autotune keys, memory.
2. cvmm (150): every CVMM call form at the paper's 262M shapes (benchmarks/cvmm.py, set 262m),
   bf16, forward and forward + backward, Triton fast and deterministic, against a cuBLAS
   matmul of equal useful FLOPs ("dense") and `F.grouped_mm`; 16k tokens (`--cvmm-tokens`).
3. attention (60): the SwitchHead vs dense attention sub-layer of C4 and WT103 262M
   (benchmarks/attention_layer.py), bf16, batch 8, T 512: time and peak memory ratios.
4. train (130): `Trainer.train_step` of the C4 47M and 262M dense, SwitchHead and SwitchAll
   configs, bf16 autocast, on byte-level data prepared from the embedded corpus: step time,
   tokens/s, peak memory and MFU (active-expert training FLOPs of `switchall count` over the
   GPU's dense bf16 peak: the table in acceptance_sections.py, or `--peak-tflops`).

Robustness: every section runs in worker processes with a deadline (a hang is killed with its
process group); a worker that dies (CUDA error, OOM, kill) costs only the item it was on, and
the next worker continues with the rest; a Python error in one item is reported in the table
and the section goes on. The report is rewritten atomically after every item, so a kill at
any moment leaves a readable report of everything finished so far.

In `--smoke` mode (no GPU needed) the same code runs on the CPU at tiny sizes and every
section is headed "CPU smoke: not GPU figures"; on a GPU the header says "real GPU figures".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUDGETS = {"kernel_tests": 120.0, "cvmm": 150.0, "attention": 60.0, "train": 130.0}
TITLES = {
    "kernel_tests": "GPU kernel tests (tests/kernels/test_cvmm_gpu.py)",
    "cvmm": "CVMM per call form at the 262M shapes vs dense and grouped_mm",
    "attention": "SwitchHead vs dense attention layer, 262M, T 512",
    "train": "Training step: 47M and 262M, dense / SwitchHead / SwitchAll (C4 configs)",
}


def section_items(section: str, args) -> list[str]:
    sys.path.insert(0, str(HERE))
    import acceptance_sections as acc

    # --smoke takes one item of each kind: the others run the same code on other shapes.
    if section == "kernel_tests":
        return ["pytest"]
    if section == "cvmm":
        import cvmm

        problems = cvmm.SETS["262m"]
        if args.smoke:
            return [f"{p.name}@32" for p in problems if p.name in acc.SMOKE_CVMM]
        return [f"{p.name}@{t}" for t in args.cvmm_tokens for p in problems]
    if section == "attention":
        return ["C4 262M"] if args.smoke else ["C4 262M", "WT103 262M"]
    return acc.SMOKE_TRAIN if args.smoke else list(acc.TRAIN_CONFIGS)


# ----------------------------------------------------------------------------- worker
def worker(section: str, items: list[str], results: Path, smoke: bool, budget_s: float) -> None:
    """Measure items in order, appending one JSON line per item (rows, or the error)."""
    import traceback

    sys.path.insert(0, str(HERE))
    import acceptance_sections as acc

    fn = acc.SECTIONS[section]
    for item in items:
        start = time.perf_counter()
        if os.environ.get("ACCEPTANCE_CRASH_ITEM") == item:  # the driver's own test: a hard crash
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            out = {"item": item, "ok": True, "rows": fn(item, smoke, budget_s)}
        except Exception as e:  # reported in the table; the section goes on
            out = {"item": item, "ok": False, "error": f"{type(e).__name__}: {e}"[:600]}
            traceback.print_exc()
            if _cuda_broken():
                out["error"] += " (CUDA context unusable: the next item gets a new worker)"
                _append(results, {**out, "seconds": time.perf_counter() - start})
                sys.exit(3)
        _append(results, {**out, "seconds": round(time.perf_counter() - start, 1)})
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _cuda_broken() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        torch.cuda.synchronize()
        return False
    except Exception:
        return True


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line from a kill
            pass
    return out


# ----------------------------------------------------------------------------- driver
class Report:
    """The markdown report, rewritten atomically (tmp + rename) whenever something finishes."""

    def __init__(self, path: Path, header: list[str]):
        self.path, self.header, self.sections = path, header, {}

    def update(self, section: str, text: str) -> None:
        self.sections[section] = text
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        body = "\n".join(self.header) + "\n\n" + "\n\n".join(self.sections.values()) + "\n"
        tmp.write_text(body)
        os.replace(tmp, self.path)


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return lines


def render(section: str, records: list[dict], status: str, elapsed: float, budget: float,
           figures: str) -> str:  # fmt: skip
    lines = [f"## {TITLES[section]}", "", f"{figures}. Status: {status}; "
             f"{elapsed:.0f} s of a {budget:.0f} s budget.", ""]  # fmt: skip
    rows = [row for r in records if r.get("ok") for row in r["rows"]]
    lines += _table(rows)
    failed = [r for r in records if not r.get("ok")]
    if failed:
        lines += ["", "Failed items:", ""]
        lines += [f"- `{r['item']}`: {r.get('error', 'worker died')}" for r in failed]
    return "\n".join(lines)


def run_section(section: str, args, report: Report, work: Path, figures: str, env) -> bool:
    budget = args.budgets[section]
    items = section_items(section, args)
    results = work / f"{section}.jsonl"
    start = time.perf_counter()
    status = "running"
    while True:
        done = {r["item"] for r in _read(results)}
        todo = [i for i in items if i not in done]
        left = budget - (time.perf_counter() - start)
        if not todo:
            status = "done"
            break
        if left < 5:
            status = f"out of time; not run: {', '.join(todo)}"
            break
        cmd = [sys.executable, str(Path(__file__)), "--worker", section, "--results",
               str(results), "--budget-s", str(left), *(["--smoke"] if args.smoke else []),
               "--items", json.dumps(todo)]  # fmt: skip
        log = open(work / f"{section}.log", "a")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        finally:
            log.close()
        done_now = {r["item"] for r in _read(results)}
        unfinished = [i for i in todo if i not in done_now]
        if rc == 0 and not unfinished:
            continue
        if unfinished:  # the worker died or was killed on this item
            why = "timed out" if rc is None else f"worker exited with code {rc}"
            tail = (work / f"{section}.log").read_text()[-400:].replace("\n", " ")
            _append(results, {"item": unfinished[0], "ok": False, "error": f"{why}: {tail}"})
        report.update(section, render(section, _read(results), "running",
                                      time.perf_counter() - start, budget, figures))  # fmt: skip
    records = _read(results)
    rows = [row for r in records if r.get("ok") for row in r["rows"]]
    failed_tests = sum(row.get("failed", 0) for row in rows)
    pytest_exit = [row["exit"] for row in rows if row.get("exit", 0) != 0]
    if failed_tests or pytest_exit:
        status = f"{status}; {failed_tests} test(s) failed, pytest exit {pytest_exit or 0}"
    report.update(section, render(section, records, status, time.perf_counter() - start,
                                  budget, figures))  # fmt: skip
    return all(r.get("ok") for r in records) and status == "done"  # "done; ... failed" is not


def prepare_data(work: Path, env, smoke: bool) -> Path:
    """Byte-level tokens of the embedded corpus (no download, no tokenizer training); for
    --smoke, of two of its files."""
    import sysconfig

    out = work / "data"
    inputs = []
    if smoke:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        inputs = [str(stdlib / "argparse.py"), "--val", str(stdlib / "bisect.py")]
    cmd = [sys.executable, "-m", "switchall", "prepare", *inputs, "--out", str(out),
           "--tokenizer", "byte", "--no-progress"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    return out


def header(args, cuda: bool) -> list[str]:
    import torch

    lines = [f"# switchall GPU acceptance report ({datetime.date.today().isoformat()})", ""]
    if cuda:
        gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        lines.append(
            f"**Real GPU figures**: {torch.cuda.get_device_name(0)} ({gib:.0f} GiB), "
            f"CUDA {torch.version.cuda}, torch {torch.__version__}."
        )
    else:
        lines.append(
            "**CPU smoke run: no figure in this report is a GPU figure** (tiny shapes, the CPU "
            "paths; it only shows that the acceptance run works end to end)."
        )
    try:
        import triton

        lines.append(f"triton {triton.__version__}; Python {platform.python_version()}; "
                     f"{platform.node()}; command: `{' '.join(sys.argv)}`.")  # fmt: skip
    except ImportError:
        lines.append(f"triton not installed; command: `{' '.join(sys.argv)}`.")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_acceptance.md", help="markdown report path")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (CI)")
    p.add_argument("--sections", nargs="+", choices=list(BUDGETS), default=list(BUDGETS))
    p.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS")
    p.add_argument("--cvmm-tokens", type=int, nargs="+", default=[16384])
    p.add_argument("--peak-tflops", type=float, help="bf16 dense peak for MFU (default: table)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--items", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, json.loads(args.items), Path(args.results), args.smoke, args.budget_s)
        return 0
    args.budgets = dict(BUDGETS)
    for spec in args.budget:
        name, _, seconds = spec.partition("=")
        if name not in BUDGETS:
            p.error(f"--budget {spec}: unknown section {name!r}")
        args.budgets[name] = float(seconds)

    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    out = Path(args.out).resolve()
    report = Report(out, header(args, cuda))
    if not cuda and not args.smoke:
        report.update("none", "No CUDA device is visible: nothing was measured. Use --smoke "
                              "for the CPU check.")  # fmt: skip
        print(f"no CUDA device; wrote {out}", file=sys.stderr)
        return 2
    figures = "Real GPU figures" if cuda else "CPU smoke: not GPU figures"
    with tempfile.TemporaryDirectory(prefix="switchall-acceptance-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "ACCEPTANCE_TMP": str(work), "PYTHONPATH": str(REPO),
               "PYTHONWARNINGS": "ignore"}  # fmt: skip
        if args.peak_tflops:
            env["ACCEPTANCE_PEAK_TFLOPS"] = str(args.peak_tflops)
        ok = True
        for section in args.sections:
            if section == "train":
                try:
                    env["ACCEPTANCE_DATA"] = str(prepare_data(work, env, args.smoke))
                except Exception as e:
                    report.update(section, f"## {TITLES[section]}\n\nNot run: preparing the "
                                           f"data failed: {e}")  # fmt: skip
                    ok = False
                    continue
            t0 = time.perf_counter()
            ok &= run_section(section, args, report, work, figures, env)
            print(f"{section}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"wrote {out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
