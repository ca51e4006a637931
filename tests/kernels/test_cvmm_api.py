"""The public `cvmm` surface: backend and determinism selection, autocast, argument errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from switchall.kernels import CVMMConfig, cvmm, cvmm_op, cvmm_prepare, cvmm_triton
from tests.kernels.cvmm_cases import (
    CASE_BY_NAME,
    TOLERANCE,
    assert_close_scaled,
    make_inputs,
    reference_with_grads,
    run_with_grads,
)
from tests.subproc import subprocess_env


@pytest.fixture
def calls(monkeypatch):
    """Records which backend implementation each cvmm call reached, and its options."""
    seen = []

    def spy(name, fn):
        def wrapper(*args):
            seen.append((name, args))
            return fn(*args)

        return wrapper

    monkeypatch.setattr(cvmm_op, "torch_forward", spy("torch", cvmm_op.torch_forward))
    monkeypatch.setattr(cvmm_triton, "cvmm_forward", spy("triton", cvmm_triton.cvmm_forward))
    monkeypatch.delenv(cvmm_op.BACKEND_ENV, raising=False)
    monkeypatch.delenv(cvmm_op.DETERMINISTIC_ENV, raising=False)
    return seen


def _small():
    return make_inputs(CASE_BY_NAME["nonmultiple_k2"])


def test_cpu_tensors_default_to_the_torch_backend(calls):
    x, idx, w, gates = _small()
    cvmm(x, idx, w, gates)
    assert [name for name, _ in calls] == ["torch"]


def test_backend_argument_and_env_var_select_triton(calls, monkeypatch):
    x, idx, w, gates = _small()
    want = cvmm(x, idx, w, gates, backend="torch")
    got = cvmm(x, idx, w, gates, backend="triton")
    monkeypatch.setenv(cvmm_op.BACKEND_ENV, "triton")
    got_env = cvmm(x, idx, w, gates)
    # The per-call argument wins over the environment.
    cvmm(x, idx, w, gates, backend="torch")
    assert [name for name, _ in calls] == ["torch", "triton", "triton", "torch"]
    assert_close_scaled(got, want, TOLERANCE[torch.float32], "triton via argument")
    assert torch.equal(got, got_env)


def test_bad_backend_names_are_rejected(monkeypatch):
    x, idx, w, _ = _small()
    with pytest.raises(ValueError, match="backend"):
        cvmm(x, idx, w, backend="cuda")
    monkeypatch.setenv(cvmm_op.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=cvmm_op.BACKEND_ENV):
        cvmm(x, idx, w)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x, idx, w, _ = _small()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cvmm(x, idx, w, backend="triton")


def test_deterministic_flag_resolution(calls, monkeypatch):
    """Argument, then $SWITCHALL_CVMM_DETERMINISTIC, then torch's global deterministic flag."""
    x, idx, w, gates = _small()

    def flags():
        return [args[8] for _, args in calls]  # cvmm_forward(..., deterministic, allow_tf32)

    cvmm(x, idx, w, gates, backend="triton")
    cvmm(x, idx, w, gates, backend="triton", deterministic=True)
    monkeypatch.setenv(cvmm_op.DETERMINISTIC_ENV, "1")
    cvmm(x, idx, w, gates, backend="triton")
    cvmm(x, idx, w, gates, backend="triton", deterministic=False)
    monkeypatch.delenv(cvmm_op.DETERMINISTIC_ENV)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        cvmm(x, idx, w, gates, backend="triton")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert flags() == [False, True, True, False, True]
    monkeypatch.setenv(cvmm_op.DETERMINISTIC_ENV, "maybe")
    with pytest.raises(ValueError, match=cvmm_op.DETERMINISTIC_ENV):
        cvmm(x, idx, w, gates)


def test_config_object_passes_its_options(calls):
    x, idx, w, gates = _small()
    cfg = CVMMConfig(backend="triton", deterministic=True, allow_tf32=True)
    cvmm(x, idx, w, gates, **cfg.kwargs())
    ((name, args),) = calls
    assert name == "triton" and args[8:10] == (True, True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_computes_in_the_autocast_dtype(backend):
    """Under autocast the output is bf16, as for a matmul; fp32 leaves get fp32 gradients."""
    case = CASE_BY_NAME["R_heads_oproj"]
    x, idx, w, gates = make_inputs(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results, cot = run_with_grads(
            lambda x, i, w, g: cvmm(x, i, w, g, backend=backend), x, idx, w, gates
        )
    assert results[0].dtype == torch.bfloat16
    assert [r.dtype for r in results[1:]] == [torch.float32] * 3
    # The oracle sees the inputs as the kernels do: rounded to bf16.
    want = reference_with_grads(x.bfloat16(), idx, w.bfloat16(), gates, cot)
    for got, ref, name in zip(results, want, ("out", "x", "w", "gates"), strict=True):
        assert_close_scaled(got, ref, TOLERANCE[torch.bfloat16], name)


class _LaunchSpy:
    """Stands in for a Triton kernel (`kernel[grid](...)`) and records each launch's
    INPUT_PRECISION before running the real one."""

    def __init__(self, kernel, name: str, seen: list):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.append((self.name, kwargs["INPUT_PRECISION"]))
            return launch(*args, **kwargs)

        return run


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
def test_allow_tf32_is_a_per_call_argument(monkeypatch, deterministic):
    """allow_tf32 reaches every kernel launch of the forward and the backward (input, weight
    and gate gradients) as INPUT_PRECISION="tf32", and "ieee" without it."""
    from switchall.kernels import cvmm_gemm, cvmm_wgrad

    seen: list[tuple[str, str]] = []
    for module, name in [
        (cvmm_gemm, "_cvmm_gemm_store"),
        (cvmm_gemm, "_cvmm_gemm_accumulate"),
        (cvmm_wgrad, "_cvmm_wgrad_kernel"),
    ]:
        monkeypatch.setattr(module, name, _LaunchSpy(getattr(module, name), name, seen))
    x, idx, w, gates = _small()
    for tf32, precision in [(True, "tf32"), (False, "ieee")]:
        seen.clear()
        results, _ = run_with_grads(
            lambda x, i, w, g, tf32=tf32: cvmm(
                x, i, w, g, backend="triton", deterministic=deterministic, allow_tf32=tf32
            ),
            x, idx, w, gates,
        )  # fmt: skip
        kernels = {name for name, _ in seen}
        assert "_cvmm_wgrad_kernel" in kernels and len(kernels) >= 2, seen
        assert {p for _, p in seen} == {precision}, seen
        # On CPU (interpreter) TF32 changes nothing numerically.
        want, _ = run_with_grads(lambda x, i, w, g: cvmm(x, i, w, g), x, idx, w, gates)
        for got, ref in zip(results, want, strict=True):
            assert_close_scaled(got, ref, TOLERANCE[torch.float32], f"tf32={tf32}")
    assert not torch.backends.cuda.matmul.allow_tf32  # never switched globally


def test_argument_errors():
    x, idx, w, gates = _small()
    with pytest.raises(ValueError, match="does not match"):
        cvmm(x[:-1], idx, w)
    with pytest.raises(ValueError, match="weight must be"):
        cvmm(x, idx, w[:, :-1])
    with pytest.raises(ValueError, match="experts"):
        cvmm(x, cvmm_prepare(idx, w.shape[0] + 1), w)
    with pytest.raises(ValueError, match="gates"):
        cvmm(x, idx, w, gates[:, :1])
    with pytest.raises(TypeError, match="gates must be floating"):
        cvmm(x, idx, w, (gates > 0.5).long())
    with pytest.raises(TypeError, match="share a dtype"):
        cvmm(x, idx, w.bfloat16())
    with pytest.raises(TypeError, match="triton backend"):
        cvmm(x.double(), idx, w.double(), backend="triton")
    # fp64 runs on the torch backend (numerical checks elsewhere in the test suite use it).
    out64 = cvmm(x.double(), idx, w.double(), gates.double(), backend="torch")
    assert out64.dtype == torch.float64
    assert_close_scaled(out64, cvmm(x, idx, w, gates), TOLERANCE[torch.float32], "fp64")
    with pytest.raises(TypeError, match="int64 or int32"):
        cvmm(x, idx.float(), w)
    with pytest.raises(ValueError, match="expert ids"):
        cvmm(x, idx + w.shape[0], w)
    with pytest.raises(ValueError, match="expert ids"):
        cvmm(x, idx - 1 - idx.max(), w)


def test_launcher_asserts_its_contract():
    from switchall.kernels.cvmm_gemm import gather_gemm
    from switchall.kernels.cvmm_wgrad import cvmm_weight_grad

    x, idx, w, _ = _small()
    sel = cvmm_prepare(idx, w.shape[0])
    out = torch.empty(sel.num_assignments, w.shape[2])
    args = (sel.order_M, sel.offsets_E1, sel.num_assignments)
    with pytest.raises(AssertionError, match="vs B"):
        gather_gemm(x[:, :-1], 2, w, *args, out=out, out_div=1)
    with pytest.raises(AssertionError, match="dtypes"):
        gather_gemm(x.half(), 2, w, *args, out=out, out_div=1)
    with pytest.raises(AssertionError, match="fp32 OUT"):
        gather_gemm(x, 2, w, *args, out=out.half(), out_div=2, atomic=True)
    with pytest.raises(AssertionError, match="int64"):
        gather_gemm(x, 2, w, sel.order_M.int(), *args[1:], out=out, out_div=1)
    with pytest.raises(AssertionError, match="vs grad"):
        cvmm_weight_grad(
            x, 2, out.half(), 1, sel.order_M, sel.offsets_E1,
            gates=None, out_dtype=w.dtype, deterministic=True,
        )  # fmt: skip


def test_cpu_path_works_without_triton():
    """`import switchall` and the torch backend never import triton; asking for the triton
    backend then fails with a clear error. Runs in a fresh interpreter where triton is
    unimportable."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, switchall.kernels as K\n"
        "x, w = torch.randn(5, 8), torch.randn(3, 8, 4)\n"
        "idx = torch.randint(0, 3, (5, 2))\n"
        "assert K.cvmm(x, idx, w, torch.rand(5, 2)).shape == (5, 4)\n"
        "try:\n"
        "    K.cvmm(x, idx, w, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'unavailable' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('triton backend ran without triton')\n"
    )
    env = subprocess_env(TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
