"""Plots of `switchall analyze` (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

MAX_HEADS = 8  # per model and layer in attention_layer{i}.png (the max is over all heads)


def _heat(ax, m, title):
    ax.imshow(m, cmap="Blues", vmin=0.0, vmax=float(m.max()) or 1.0, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def attention_max(out: Path, maps) -> Path:
    names = list(maps)
    layers = max(len(v) for v in maps.values())
    fig, axes = plt.subplots(
        len(names), layers, figsize=(2.2 * layers, 2.4 * len(names)), squeeze=False
    )
    for r, name in enumerate(names):
        for layer in range(layers):
            ax = axes[r][layer]
            if layer < len(maps[name]):
                _heat(
                    ax,
                    maps[name][layer].max(0).values,
                    f"{name}\nlayer {layer}: max of {maps[name][layer].shape[0]} heads",
                )
            else:
                ax.axis("off")
    fig.suptitle("Attention, max over heads (rows: destination token, columns: source token)")
    return _save(fig, out / "attention_max.png")


def attention_layers(out: Path, maps) -> list[Path]:
    paths = []
    names = list(maps)
    for layer in range(max(len(v) for v in maps.values())):
        cols = 1 + min(MAX_HEADS, max(v[layer].shape[0] for v in maps.values() if layer < len(v)))
        fig, axes = plt.subplots(
            len(names), cols, figsize=(2 * cols, 2.3 * len(names)), squeeze=False
        )
        for r, name in enumerate(names):
            row = axes[r]
            for ax in row:
                ax.axis("off")
            if layer >= len(maps[name]):
                continue
            p_HTL = maps[name][layer]
            for h in range(min(MAX_HEADS, p_HTL.shape[0])):
                row[h].axis("on")
                _heat(row[h], p_HTL[h], f"{name} head {h}")
            row[-1].axis("on")
            _heat(row[-1], p_HTL.max(0).values, f"{name} max over heads")
        fig.suptitle(f"Layer {layer}: attention per head (destination x source)")
        paths.append(_save(fig, out / f"attention_layer{layer}.png"))
    return paths


def expert_usage(out: Path, usage) -> Path | None:
    keys = [(name, k, c) for name, counts in usage.items() for k, c in counts.items()]
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, key, c_HE) in zip(axes.flat, keys, strict=False):
        ax.axis("on")
        heads, experts = c_HE.shape
        share = c_HE.double() / c_HE.sum(-1, keepdim=True).clamp_min(1)
        width = 0.8 / heads
        for h in range(heads):
            ax.bar(torch.arange(experts) + h * width, share[h], width, label=f"head {h}")
        ax.axhline(1.0 / experts, color="black", lw=0.8, ls="--")
        ax.set_xticks(torch.arange(experts) + 0.4 - width / 2, [str(e) for e in range(experts)])
        ax.set_title(f"{name}: {key}", fontsize=8)
        ax.set_xlabel("expert")
        ax.set_ylabel("share of selections")
        if heads > 1:
            ax.legend(fontsize=6)
    fig.suptitle("Expert usage over the validation batches (dashed: uniform)")
    return _save(fig, out / "expert_usage.png")


def selections(out: Path, sels, words) -> Path | None:
    keys = [(name, k, ids) for name, last in sels.items() for k, ids in last.items()]
    if not keys:
        return None
    fig, axes = plt.subplots(
        1, len(keys), figsize=(2.2 * len(keys) + 1, 0.14 * len(words) + 2), squeeze=False
    )
    for i, (ax, (name, key, ids_XHK)) in enumerate(zip(axes[0], keys, strict=True)):
        heads = ids_XHK.shape[1]
        experts = int(ids_XHK.max()) + 1
        grid = torch.zeros(ids_XHK.shape[0], heads * experts)
        for h in range(heads):
            grid.scatter_(1, ids_XHK[:, h] + h * experts, 1.0)
        ax.imshow(grid, cmap="Blues", aspect="auto", interpolation="nearest")
        ax.set_title(f"{name}\n{key}", fontsize=7)
        ax.set_xlabel("head x expert", fontsize=7)
        ax.set_xticks([])
        if i == 0:
            ax.set_yticks(range(len(words)))
            ax.set_yticklabels([repr(w)[1:-1][:12] for w in words], fontsize=5)
        else:
            ax.set_yticks([])
    fig.suptitle("Selected experts per token of the text")
    return _save(fig, out / "selections.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(out: Path, models, maps, sels, words) -> list[Path]:
    usage = {name: counts for name, (_, counts) in sels.items()}
    last = {name: lst for name, (lst, _) in sels.items()}
    made = [
        attention_max(out, maps),
        *attention_layers(out, maps),
        expert_usage(out, usage),
        selections(out, last, words),
    ]
    return [p for p in made if p is not None]
