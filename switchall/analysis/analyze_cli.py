"""`switchall analyze RUN_DIR_OR_MODEL [--compare OTHER] --out DIR`: PNGs and `summary.json`.

Writes `attention_max.png` (max over heads, per layer; the models side by side on the same
text), `attention_layer{i}.png` (every head and the max), `expert_usage.png` (how often each
expert is chosen over the validation batches, per layer, side and head), `selections.png`
(which experts each token of the text selects) and `summary.json` (per-head attention entropy
and distance, expert shares and the most typical tokens of each expert).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from switchall.configtools import ConfigError


def _val_batches(lm, batches: int, batch_size: int):
    from switchall.data_pipeline import TokenLoader

    loader = TokenLoader(
        lm.cfg.data.path,
        split="val",
        global_batch_size=batch_size,
        seq_len=lm.cfg.model.seq_len,
        dp_rank=0,
        dp_size=1,
        seed=0,
        mode="contiguous",
        loop=False,
        num_workers=0,
    )
    out = []
    for i, b in enumerate(loader):
        if i >= batches:
            break
        out.append(b)
    if not out:
        raise ConfigError("data.path", f"{lm.cfg.data.path}: the validation split has no batch")
    return [b[:, :-1] for b in out], [b[:, 1:] for b in out]


def _tokenizer_sha(lm) -> str | None:
    from switchall.data_pipeline import read_manifest

    return read_manifest(lm.cfg.data.path).tokenizer.get("sha256")


def run_analyze(args: argparse.Namespace) -> int:
    from switchall.analysis import analyze as an
    from switchall.analysis import analyze_plots as plots
    from switchall.data_pipeline import load_tokenizer
    from switchall.fileio import write_atomic

    paths = [args.model] + ([args.compare] if args.compare else [])
    models = [an.load_model(p, args.data) for p in paths]
    if len({_tokenizer_sha(m) for m in models}) > 1:
        raise ConfigError("--compare", "the two models were trained with different tokenizers")
    names = [m.name for m in models]
    if len(set(names)) < len(names):
        for i, m in enumerate(models):
            m.name = f"{m.name}#{i + 1}"
    tok = load_tokenizer(models[0].cfg.data.path)
    inputs, targets = _val_batches(models[0], args.batches, args.batch_size)
    n = min(args.tokens, inputs[0].shape[1])
    text_T = inputs[0][0, :n]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    summary = {"text": tok.decode(text_T.tolist()), "tokens": n, "models": []}
    maps, sels = {}, {}
    for lm in models:
        maps[lm.name] = an.attention_maps(lm, text_T)
        usage = an.expert_selections(lm, inputs)
        sels[lm.name] = an.expert_selections(lm, [text_T[None]])["last"], usage["counts"]
        entry = {
            "name": lm.name,
            "checkpoint": lm.source,
            "variant": lm.cfg.model.variant,
            "val_loss_on_batches": an.cross_entropy_of(lm, inputs, targets),
            "attention": an.attention_summary(maps[lm.name]),
            "experts": {},
        }
        for key, c_HE in usage["counts"].items():
            share = (c_HE / c_HE.sum(-1, keepdim=True).clamp_min(1)).tolist()
            entry["experts"][key] = [
                {
                    "head": h,
                    "share": [round(s, 4) for s in share[h]],
                    "typical_tokens": an.typical_tokens(
                        usage["by_token"][key][h], c_HE.shape[1], tok.decode
                    ),
                }
                for h in range(c_HE.shape[0])
            ]
        summary["models"].append(entry)
    written = plots.write_all(out, models, maps, sels, [tok.decode([t]) for t in text_T.tolist()])
    write_atomic(out / "summary.json", json.dumps(summary, indent=1).encode())
    for p in [*written, out / "summary.json"]:
        print(f"wrote {p}")
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "analyze",
        help="attention maps and expert selections of a trained model (spec §9)",
        description=__doc__,
    )
    p.add_argument(
        "model", help="a run directory (its latest checkpoint, any layout) or an export directory"
    )
    p.add_argument("--compare", help="a second model (e.g. the dense baseline), same tokenizer")
    p.add_argument("--out", required=True, help="output directory for PNGs and summary.json")
    p.add_argument(
        "--data", help="the dataset to analyse on (needed for an export; default: the run's)"
    )
    p.add_argument("--tokens", type=int, default=64, help="tokens of text for attention maps")
    p.add_argument("--batches", type=int, default=8, help="validation batches for usage")
    p.add_argument("--batch-size", type=int, default=4, help="rows per validation batch")
    p.set_defaults(func=run_analyze)
