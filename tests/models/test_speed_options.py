"""`train.compile` and `train.activation_checkpointing` on the model: a SwitchAll block traces
without graph breaks, a compiled model trains like the eager one, and checkpointed blocks give
the plain run's gradients while recomputing in backward.

Compiled tests use the `aot_eager` backend: Dynamo captures the graph and AOTAutograd derives
the backward from the registered CVMM autograd, then eager kernels run it. That is where graph
breaks and tracing errors show up, without Inductor's C++ build (minutes on 2 CPU cores);
Inductor's speed is measured by `benchmarks/step_time.py` instead.
"""

from __future__ import annotations

import pytest
import torch

from switchall.config import load_run_config
from switchall.configtools import ConfigError
from switchall.models.lm import Block, LanguageModel
from switchall.models.routing import NoiseContext
from switchall.pretrain.config import OptimConfig
from switchall.pretrain.engine import LocalEngine
from switchall.pretrain.speed import apply_speed_options
from tests.models.helpers import tiny_config

# Dropout everywhere the model has it: residual (torch RNG) and expert dropout on both routers.
DROPS = dict(
    dropout=0.1, attention__expert_dropout=0.2, moe__expert_dropout=0.2, moe__entropy_reg=1e-2
)


def _inputs(cfg, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def test_switchall_block_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break: routing, sorting, both CVMM forms, XL memory,
    expert dropout and the regulariser trace as one graph; outputs and every gradient equal
    the eager block's."""
    torch._dynamo.reset()
    cfg = tiny_config("switchall", **DROPS)
    block = Block(cfg, layer_idx=1).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.seq_len, cfg.d_model, generator=gen)
    mem = torch.randn(2, cfg.mem_len, cfg.d_model, generator=gen)
    noise = NoiseContext(seed=7, row_offset=3)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (block, compiled):
        torch.manual_seed(5)  # the same residual-dropout masks for both
        leaves = [x.clone().requires_grad_(), mem.clone().requires_grad_()]
        y, aux = fn(leaves[0], leaves[1], noise)
        (y.square().mean() + aux).backward()
        grads = [p.grad.clone() for p in block.parameters()]
        block.zero_grad(set_to_none=True)
        results.append([y.detach(), aux.detach(), leaves[0].grad, leaves[1].grad, *grads])
    for eager, comp in zip(*results, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-7)


def _train(model: LanguageModel, steps: int, cfg) -> list[float]:
    """Plain loop with XL memory carried and the trainer's noise context, AdamW, clipping."""
    engine = LocalEngine(model, OptimConfig(lr=3e-3, grad_clip=0.25), steps)
    memory, losses = None, []
    for step in range(steps):
        inp, tgt = _inputs(cfg, seed=step)
        out = model(inp, memory, noise=NoiseContext(seed=100 + step))
        lm = torch.nn.functional.cross_entropy(out.logits_BTV.flatten(0, 1), tgt.flatten())
        engine.backward(lm + out.aux_loss)
        engine.step(step)
        memory = out.memory
        losses.append(float(lm.detach()))
    return losses


def test_compiled_model_trains_like_eager():
    """Three AdamW steps of a compiled SwitchAll LM (XL memory, expert dropout) track eager.

    Tolerance 1e-6 relative per step: the same kernels run in the same order, so only the
    graph's different intermediate layouts can change a rounding (measured: 0)."""
    torch._dynamo.reset()
    cfg = tiny_config("switchall", n_layers=1, attention__expert_dropout=0.2)
    runs = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = LanguageModel(cfg).train()
        train = load_run_config(
            "configs/demo_switchall.yaml",
            [f"train.compile={str(compile_).lower()}", "train.compile_backend=aot_eager"],
        ).train
        apply_speed_options(model, train)
        runs.append(_train(model, 3, cfg))
    eager, compiled = runs
    assert compiled == pytest.approx(eager, rel=1e-6)


@pytest.mark.parametrize("seeded", [True, False], ids=["noise_context", "torch_rng"])
def test_activation_checkpointing_gives_the_plain_gradients(seeded):
    """Each block is recomputed in backward (its forward starts twice: the recomputation stops
    early once it has what backward needs, so only pre-hooks see it) and the gradients are the
    plain run's bit for bit, over two chunks with XL memory, residual and expert dropout.
    Expert dropout draws from the hashed noise context, or from the torch RNG without one:
    both must draw the same masks on recompute."""
    cfg = tiny_config("switchall", **DROPS)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LanguageModel(cfg).train()
        model.activation_checkpointing = checkpointing
        calls = []
        for block in model.blocks:
            block.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(1)
        memory, loss = None, 0.0
        for chunk in range(2):
            inp, tgt = _inputs(cfg, seed=chunk)
            noise = NoiseContext(seed=11 + chunk) if seeded else None
            out = model(inp, memory, noise=noise)
            ce = torch.nn.functional.cross_entropy(out.logits_BTV.flatten(0, 1), tgt.flatten())
            loss = loss + ce + out.aux_loss
            memory = out.memory
        loss.backward()
        assert len(calls) == cfg.n_layers * 2 * (2 if checkpointing else 1)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


def test_checkpointing_is_off_without_grad():
    """Evaluation (no_grad) runs blocks once, never through checkpoint."""
    cfg = tiny_config("switchall")
    model = LanguageModel(cfg).eval()
    model.activation_checkpointing = True
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(_inputs(cfg)[0])
    assert len(calls) == 1


def test_speed_keys_are_validated():
    with pytest.raises(ConfigError, match="train.compile_backend"):
        load_run_config("configs/demo_switchall.yaml", ["train.compile_backend=tvm"])
    with pytest.raises(ConfigError, match="train.compile"):
        load_run_config("configs/demo_switchall.yaml", ["train.compile=sometimes"])
