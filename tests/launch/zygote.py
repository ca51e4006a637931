"""A process that imports torch and switchall once, then forks a fresh `switchall ...` process
per request: the local fault tests start a dozen trainers, and the imports (seconds of CPU
each) would otherwise dominate them. Each child is a real, separate process (its own session,
pid and signal handlers) doing what `python -m switchall ARGS` does; the tests kill and signal
it by pid like any other. Only the import work is shared (nothing has run in the parent, so
no thread pools or locks are inherited).

Protocol, one JSON object per line on stdin / stdout:
  {"op": "start", "args": [...], "log": PATH, "env": {...}, "driver": bool} -> {"pid": N}
  {"op": "poll", "pid": N} -> {"status": CODE or null}   (CODE as Popen.returncode)
  {"op": "wait", "pid": N} -> {"status": CODE}
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch  # noqa: F401  (the point: imported once, here)
import torch._dynamo  # noqa: F401  (torch.optim imports it lazily: seconds)

import switchall.cli
import switchall.data_pipeline.loader  # noqa: F401
import switchall.pretrain.startup  # noqa: F401
import switchall.pretrain.trainer  # noqa: F401


def child(req: dict) -> None:
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(req.get("env", {}))
    sys.argv = ["switchall", *req["args"]]
    code = 1
    try:
        if req.get("driver"):
            sys.path.insert(0, os.path.dirname(__file__))
            import driver

            driver.install_faults(os.environ)
        code = switchall.cli.main(req["args"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "start":
            pid = os.fork()
            if pid == 0:
                child(req)
            reply = {"pid": pid}
        else:
            flags = os.WNOHANG if req["op"] == "poll" else 0
            done, status = os.waitpid(req["pid"], flags)
            reply = {"status": os.waitstatus_to_exitcode(status) if done else None}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
