"""Parameter matching of SwitchHead / SwitchAll points to their dense point (spec §1.5).

The paper sets n_heads·E to the dense model's head count, picks n_heads and k, then chooses
d_head so that the parameter count matches the baseline and re-matches d_ff. Here the target is
the dense point's non-embedding parameter count (the embedding and output layer are the same
for every variant of a size) and the solved keys are, in order:

- switchhead: `attention.d_head` (with the dense d_ff: matches the attention), then `mlp.d_ff`;
- switchall: `attention.d_head` as for SwitchHead, then `moe.n_experts` (the σ-MoE replaces the
  dense MLP) jointly with `attention.d_head`: for each expert count near the solution, the head
  width that absorbs what one expert's granularity leaves over; the closest pair wins;
- sigma_moe: `moe.n_experts` jointly with `attention.d_head`.

Every count is the real model's (built on the meta device). Parameter counts are affine in
each of these keys, so two counts give the solution; the nearest valid integers around it are
checked with real counts and the closest one wins. `attention.n_experts: auto` means
dense heads / n_heads (the paper's rule 1).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from typing import Any

from switchall.configtools import ConfigError, from_dict, validate_tree
from switchall.models.config import ModelConfig

DEFAULT_SOLVE = {
    "transformer": [],
    "switchhead": ["attention.d_head", "mlp.d_ff"],
    "switchall": ["attention.d_head@switchhead", "moe.n_experts|attention.d_head"],
    "sigma_moe": ["moe.n_experts|attention.d_head"],
}


class MatchError(ValueError):
    pass


def model_from_tree(tree: dict[str, Any]) -> ModelConfig:
    cfg = from_dict(ModelConfig, tree, prefix="model")
    validate_tree(cfg, "model")
    return cfg


_COUNTS: dict[str, int] = {}


@contextlib.contextmanager
def skip_init():
    """Build modules without running their initialisers: a count needs only the shapes, and
    initialisers on the meta device cost more than everything else a plan does."""
    from torch import nn

    from switchall.models.attention import DenseAttention
    from switchall.models.lm import LanguageModel
    from switchall.models.mlp import DenseMLP
    from switchall.models.sigma_moe import SigmaMoE
    from switchall.models.switchhead import SwitchHeadAttention

    classes = (
        LanguageModel,
        DenseAttention,
        SwitchHeadAttention,
        SigmaMoE,
        DenseMLP,
        nn.Linear,
        nn.LayerNorm,
        nn.Embedding,
    )
    saved = {c: c.__dict__.get("reset_parameters") for c in classes}
    for c in classes:
        c.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for c, fn in saved.items():
            if fn is None:
                del c.reset_parameters
            else:
                c.reset_parameters = fn


def non_embedding_params(tree: dict[str, Any]) -> int:
    """Of the real model built on the meta device (memoised: a plan counts many variants)."""
    from switchall.analysis.count_cli import count_params

    key = json.dumps(tree, sort_keys=True)
    if key not in _COUNTS:
        cfg = model_from_tree(tree)
        with skip_init():
            _COUNTS[key] = count_params(cfg)[1]
    return _COUNTS[key]


def _get(tree: dict[str, Any], key: str) -> Any:
    node = tree
    for part in key.split("."):
        node = node[part]
    return node


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _valid(tree: dict[str, Any], extra_check) -> str | None:
    """None if `tree` validates (and passes `extra_check`), else the reason."""
    try:
        if extra_check is not None:
            extra_check(tree)
        model_from_tree(tree)
    except (ConfigError, MatchError) as e:
        return str(e)
    return None


def solve_key(
    tree: dict[str, Any], key: str, target: int, multiple: int = 1, extra_check=None
) -> dict[str, Any]:
    """`tree` with integer `key` set so that the non-embedding parameters are closest to
    `target` (a multiple of `multiple`, and a config that validates).

    The count is affine in `key`: two real counts give the line; candidates around the
    solution are validated (cheap) and predicted from it; the pick is counted for real.
    """
    start = int(_get(tree, key))
    probe = copy.deepcopy(tree)
    counts: dict[int, int] = {}
    reason = None
    for v in (start + i * multiple for i in (0, 1, 2, -1, 3)):
        if v < max(1, multiple):
            continue
        _set(probe, key, v)
        reason = _valid(probe, None)  # some values do not validate (odd RoPE channels)
        if reason is None:
            counts[v] = non_embedding_params(probe)
        if len(counts) == 2:
            break
    if len(counts) < 2:
        raise MatchError(f"no valid {key} near {start} to solve from ({reason})")
    (v0, n0), (v1, n1) = sorted(counts.items())
    slope = (n1 - n0) / (v1 - v0)
    if slope <= 0:
        raise MatchError(f"{key} does not change the parameter count; it cannot be solved for")
    exact = v0 + (target - n0) / slope
    centre = int(round(exact / multiple)) * multiple
    best = None
    for v in sorted({centre + i * multiple for i in range(-3, 4)}):
        if v < max(1, multiple):
            continue
        _set(probe, key, v)
        if _valid(probe, extra_check) is not None:
            continue
        n = n0 + slope * (v - v0)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (v, n)
    if best is None:
        raise MatchError(f"no valid {key} near {exact:.1f} matches {target:,} parameters")
    out = copy.deepcopy(tree)
    _set(out, key, best[0])
    return out


def resolve_auto_experts(tree: dict[str, Any], dense: dict[str, Any]) -> None:
    att = tree.setdefault("attention", {})
    if att.get("n_experts") != "auto":
        return
    dense_heads, heads = dense["attention"]["n_heads"], att.get("n_heads")
    if not isinstance(heads, int) or heads < 1 or dense_heads % heads:
        raise MatchError(
            f"attention.n_experts: auto needs n_heads ({heads}) to divide the dense model's "
            f"{dense_heads} heads"
        )
    att["n_experts"] = dense_heads // heads


def match_model(
    tree: dict[str, Any],
    dense: dict[str, Any],
    solve: list[str] | None = None,
    moe_experts_multiple: int = 1,
    tolerance: float = 0.005,
) -> dict[str, Any]:
    """The model tree of a point, with the solved keys set to match `dense`'s parameters."""
    tree = copy.deepcopy(tree)
    resolve_auto_experts(tree, dense)
    order = DEFAULT_SOLVE.get(tree["variant"], []) if solve is None else solve
    if not order:
        return tree
    target = non_embedding_params(dense)
    # Keys may be missing from a base config that lacks a section: start from the dense ones.
    from switchall.models.config import MoEConfig

    for key, default in (
        ("attention.d_head", _get(dense, "attention.d_head")),
        ("mlp.d_ff", _get(dense, "mlp.d_ff")),
        ("moe.n_experts", MoEConfig().n_experts),
    ):
        section, leaf = key.split(".")
        if leaf not in tree.get(section, {}):
            _set(tree, key, default)

    def moe_k_ok(t):
        m = t.get("moe", {})
        if m.get("n_experts", 1) < m.get("k", 1):
            raise MatchError("moe.n_experts below moe.k")

    for entry in order:
        key, _, as_variant = entry.partition("@")
        if as_variant:
            # Solve on a stand-in of another variant (SwitchAll's attention matched as the
            # SwitchHead attention next to the dense MLP), then carry the value over.
            stand_in = copy.deepcopy(tree)
            stand_in["variant"] = as_variant
            stand_in["mlp"] = copy.deepcopy(dense.get("mlp", {}))
            _set(tree, key, _get(solve_key(stand_in, key, target), key))
            continue
        key, _, then = key.partition("|")
        multiple = moe_experts_multiple if key == "moe.n_experts" else 1
        check = moe_k_ok if key.startswith("moe") else None
        tree = solve_key(tree, key, target, multiple, check)
        if then:
            tree = _joint(tree, key, then, target, multiple, check, tolerance)
    return tree


def _joint(tree, key, then, target, multiple, check, tolerance) -> dict[str, Any]:
    """Around the solved `key`, each value with `then` solved for it. Of the pairs within
    `tolerance`, the one whose `then` moved least from its value before (SwitchAll: the head
    width that matches the attention alone); with none within it, the closest pair."""
    centre, then0 = int(_get(tree, key)), int(_get(tree, then))
    within, best = [], None
    for v in (centre + i * multiple for i in (0, -1, 1, -2, 2, -3, 3)):
        if v < max(1, multiple):
            continue
        cand = copy.deepcopy(tree)
        _set(cand, key, v)
        try:
            if check is not None:
                check(cand)
            cand = solve_key(cand, then, target)
        except (ConfigError, MatchError):
            continue
        err = abs(non_embedding_params(cand) - target)  # real count of each pair
        if err <= tolerance * target:
            within.append((abs(int(_get(cand, then)) - then0), err, len(within), cand))
        if best is None or err < best[0]:
            best = (err, cand)
    if within:
        return min(within)[-1]
    if best is None:
        raise MatchError(f"no valid ({key}, {then}) pair matches {target:,} parameters")
    return best[1]


def relative_mismatch(params: int, target: int) -> float:
    return abs(params - target) / target if target else math.inf
