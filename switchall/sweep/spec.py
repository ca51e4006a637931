"""The sweep file (`configs/sweeps/*.yaml`) and its expansion into points.

```yaml
base: ../demo_transformer.yaml        # the dense run config points start from (relative path)
overrides: [train.log_every=25]       # section.key=value for every point
match: {tolerance: 0.005}             # parameter matching (see `matching`)
sizes:                                # named dense shapes (shorthand or dotted model keys)
  s: {d_model: 96, n_layers: 3, n_heads: 3, d_head: 32, d_ff: 384}
  l: {config: ../paper/c4_transformer_262m.yaml}   # a shape (and training) taken from a config
variants:                             # the key names the variant; `variant` is the model's
  transformer: {}
  switchall:
    model: {attention: {n_heads: 2, n_experts: 4, k: 2}, moe: {expert_size: 32, k: 4}}
    overrides: [optim.grad_clip=0.25]
    by_size: {l: {model: {attention: {n_heads: 4}}}}   # or {config: FILE}: fixed, not solved
                                      # (the variant's `model` is not applied to fixed points)
axes: {size: [s, l], variant: [transformer, switchall], tokens: [1e6, 2e6], lr: [1e-3], seed: [0]}
points: [{size: s, variant: switchall, tokens: 4e6, overrides: [...]}]   # explicit points
```

`axes` is a grid (its cartesian product; size and variant default to all of them), `points`
an explicit list; both may be given. Point names are `size-variant`, plus the token budget,
learning rate and seed where the sweep has more than one of them.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switchall.configtools import ConfigError, apply_override, load_yaml, parse_override

SHORTHAND = {
    "d_model": ("d_model",),
    "n_layers": ("n_layers",),
    "seq_len": ("seq_len",),
    "n_heads": ("attention", "n_heads"),
    "d_head": ("attention", "d_head"),
    "d_ff": ("mlp", "d_ff"),
}
_TOP_KEYS = {"name", "base", "overrides", "match", "sizes", "variants", "axes", "points"}
_AXES = ("size", "variant", "tokens", "lr", "seed")
_POINT_KEYS = {*_AXES, "name", "overrides"}
_VARIANT_KEYS = {"variant", "model", "overrides", "by_size", "solve"}


@dataclass
class PointSpec:
    """One point before validation: its config tree and the dense tree it is matched to."""

    name: str
    size: str
    variant: str
    """The sweep's variant name (a key of `variants`)."""
    tokens: float | None
    lr: float | None
    seed: int | None
    tree: dict[str, Any]
    dense_model: dict[str, Any]
    """The model tree of this size's dense Transformer: the parameter-matching target."""
    solve: list[str] | None = None
    """Keys to solve (None: the variant's default; [] for fixed points)."""
    fixed: bool = False


@dataclass
class SweepSpec:
    path: Path
    name: str
    points: list[PointSpec]
    tolerance: float = 0.005
    moe_experts_multiple: int = 1
    errors: list[str] = field(default_factory=list)


def _err(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(key, message, source=str(path))


def _as_list(value: Any, path: Path, key: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _err(path, key, f"expected a list, got {value!r}")
    return value


def _as_map(value: Any, path: Path, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(path, key, f"expected a mapping, got {value!r}")
    return value


def deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            deep_merge(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)
    return dst


def apply_overrides(tree: dict[str, Any], overrides: list[str], path: Path, where: str) -> None:
    for i, text in enumerate(overrides):
        if not isinstance(text, str):
            raise _err(path, f"{where}[{i}]", f"expected 'section.key=value', got {text!r}")
        parts, value = parse_override(text)
        apply_override(tree, parts, value)


def _shape_tree(shape: dict[str, Any], path: Path, where: str) -> dict[str, Any]:
    """A size's shorthand / dotted model keys as a partial model tree."""
    out: dict[str, Any] = {}
    for key, value in shape.items():
        if key in ("config", "overrides"):
            continue
        parts = SHORTHAND.get(key) or tuple(key.split("."))
        if key not in SHORTHAND and "." not in key and key not in ("vocab_size", "mem_chunks"):
            raise _err(
                path,
                f"{where}.{key}",
                f"unknown size key (shorthand: {', '.join(SHORTHAND)}, or a dotted model key)",
            )
        apply_override(out, list(parts), value)
    return out


def _resolve(path: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else (path.parent / p)


def _budget_name(tokens: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if tokens >= div:
            return f"{tokens / div:.4g}{unit}"
    return f"{tokens:.0f}"


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    raw = load_yaml(path)
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise _err(path, unknown[0], f"unknown key (valid keys: {', '.join(sorted(_TOP_KEYS))})")
    if "base" not in raw:
        raise _err(path, "base", "is required: the dense run config every point starts from")
    base = _resolve(path, str(raw["base"]))
    sweep_overrides = _as_list(raw.get("overrides"), path, "overrides")
    match = _as_map(raw.get("match"), path, "match")
    for key in match:
        if key not in ("tolerance", "moe_experts_multiple"):
            raise _err(path, f"match.{key}", "unknown key (valid: moe_experts_multiple, tolerance)")
    sizes = _as_map(raw.get("sizes"), path, "sizes")
    variants = _as_map(raw.get("variants"), path, "variants")
    if not sizes:
        raise _err(path, "sizes", "at least one named size is required")
    if not variants:
        raise _err(path, "variants", "at least one variant is required")
    for name, v in variants.items():
        v = _as_map(v, path, f"variants.{name}")
        bad = sorted(set(v) - _VARIANT_KEYS)
        if bad:
            raise _err(path, f"variants.{name}.{bad[0]}", f"unknown key ({sorted(_VARIANT_KEYS)})")
        variants[name] = v
    combos = _expand(raw, path, sizes, variants)
    many = {axis: len({c.get(axis) for c in combos}) > 1 for axis in ("tokens", "lr", "seed")}
    points, seen = [], {}
    for i, combo in enumerate(combos):
        pt = _build_point(path, base, sweep_overrides, sizes, variants, combo, many, i)
        if pt.name in seen:
            raise _err(path, "points", f"two points are both named {pt.name!r}")
        seen[pt.name] = pt
        points.append(pt)
    return SweepSpec(
        path=path,
        name=str(raw.get("name") or path.stem),
        points=points,
        tolerance=float(match.get("tolerance", 0.005)),
        moe_experts_multiple=int(match.get("moe_experts_multiple", 1)),
    )


def _expand(raw, path, sizes, variants) -> list[dict[str, Any]]:
    combos: list[dict[str, Any]] = []
    axes = _as_map(raw.get("axes"), path, "axes")
    bad = sorted(set(axes) - set(_AXES))
    if bad:
        raise _err(path, f"axes.{bad[0]}", f"unknown axis (valid: {', '.join(_AXES)})")
    if axes or "points" not in raw:
        lists = {
            "size": _as_list(axes.get("size", list(sizes)), path, "axes.size"),
            "variant": _as_list(axes.get("variant", list(variants)), path, "axes.variant"),
            "tokens": _as_list(axes.get("tokens", [None]), path, "axes.tokens"),
            "lr": _as_list(axes.get("lr", [None]), path, "axes.lr"),
            "seed": _as_list(axes.get("seed", [None]), path, "axes.seed"),
        }
        for values in itertools.product(*lists.values()):
            combos.append(dict(zip(lists, values, strict=True)) | {"where": "axes"})
    for i, p in enumerate(_as_list(raw.get("points"), path, "points")):
        p = _as_map(p, path, f"points[{i}]")
        bad = sorted(set(p) - _POINT_KEYS)
        if bad:
            raise _err(path, f"points[{i}].{bad[0]}", f"unknown key ({sorted(_POINT_KEYS)})")
        for axis in ("size", "variant"):
            if axis not in p:
                raise _err(path, f"points[{i}].{axis}", "is required")
        combos.append({**p, "where": f"points[{i}]"})
    for c in combos:
        if c["size"] not in sizes:
            raise _err(path, f"{c['where']}.size", f"unknown size {c['size']!r} ({list(sizes)})")
        if c["variant"] not in variants:
            raise _err(
                path,
                f"{c['where']}.variant",
                f"unknown variant {c['variant']!r} ({list(variants)})",
            )
    return combos


def _build_point(path, base, sweep_overrides, sizes, variants, combo, many, index) -> PointSpec:
    size, vname, where = combo["size"], combo["variant"], combo["where"]
    shape = _as_map(sizes[size], path, f"sizes.{size}")
    v = variants[vname]
    by_size = _as_map(
        _as_map(v.get("by_size"), path, f"variants.{vname}.by_size").get(size),
        path,
        f"variants.{vname}.by_size.{size}",
    )
    size_src = _resolve(path, shape["config"]) if "config" in shape else base
    tree = load_yaml(size_src)
    apply_overrides(tree, sweep_overrides, path, "overrides")
    deep_merge(tree.setdefault("model", {}), _shape_tree(shape, path, f"sizes.{size}"))
    apply_overrides(
        tree,
        _as_list(shape.get("overrides"), path, f"sizes.{size}.overrides"),
        path,
        f"sizes.{size}.overrides",
    )
    dense = copy.deepcopy(tree["model"])
    dense["variant"] = "transformer"
    fixed = "config" in by_size
    if fixed:
        tree = load_yaml(_resolve(path, by_size["config"]))
        apply_overrides(tree, sweep_overrides, path, "overrides")
    model = tree.setdefault("model", {})
    model["variant"] = v.get("variant", vname)
    if not fixed:  # a fixed point is its config as written (plus the sweep's overrides)
        deep_merge(model, _as_map(v.get("model"), path, f"variants.{vname}.model"))
    deep_merge(model, _as_map(by_size.get("model"), path, f"variants.{vname}.by_size.{size}"))
    apply_overrides(
        tree,
        _as_list(v.get("overrides"), path, f"variants.{vname}.overrides"),
        path,
        f"variants.{vname}.overrides",
    )
    apply_overrides(
        tree,
        _as_list(by_size.get("overrides"), path, "by_size.overrides"),
        path,
        f"variants.{vname}.by_size.{size}.overrides",
    )
    tokens, lr, seed = combo.get("tokens"), combo.get("lr"), combo.get("seed")
    if tokens is not None:
        tokens = float(tokens)
        _set_budget(tree, tokens, path, f"{where}.tokens")
    if lr is not None:
        tree.setdefault("optim", {})["lr"] = float(lr)
    if seed is not None:
        tree.setdefault("train", {})["seed"] = int(seed)
    apply_overrides(
        tree,
        _as_list(combo.get("overrides"), path, f"{where}.overrides"),
        path,
        f"{where}.overrides",
    )
    name = combo.get("name") or "-".join(
        [size, vname]
        + ([_budget_name(tokens)] if many["tokens"] and tokens is not None else [])
        + ([f"lr{lr:g}"] if many["lr"] and lr is not None else [])
        + ([f"s{seed}"] if many["seed"] and seed is not None else [])
    )
    solve = v.get("solve")
    return PointSpec(
        name=str(name),
        size=size,
        variant=vname,
        tokens=tokens,
        lr=lr,
        seed=seed,
        tree=tree,
        dense_model=dense,
        solve=[] if fixed else solve,
        fixed=fixed,
    )


def _set_budget(tree: dict[str, Any], tokens: float, path: Path, key: str) -> None:
    """train.steps from a token budget; a cosine that spanned the run keeps spanning it."""
    train, optim = tree.setdefault("train", {}), tree.setdefault("optim", {})
    seq = tree.get("model", {}).get("seq_len")
    batch = train.get("batch_size", 64)
    if not isinstance(seq, int):
        raise _err(path, key, "a token budget needs model.seq_len in the config")
    steps = max(1, round(tokens / (batch * seq)))
    if optim.get("cosine_steps") is not None and optim["cosine_steps"] == train.get("steps"):
        optim["cosine_steps"] = steps
    train["steps"] = steps
