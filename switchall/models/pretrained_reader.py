"""Reading an export (see `switchall.models.pretrained`): format checks and lazy tensor access.

safetensors maps each file and reads a tensor, or a slice of one, only when asked, so a rank of
a parallel run can take its own shard of every tensor without loading the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from switchall.configtools import ConfigError, from_dict, validate_tree
from switchall.data_pipeline.manifest import DataError
from switchall.fileio import sha256_file
from switchall.models.config import ModelConfig
from switchall.models.lm import build_model

FORMAT = "switchall.pretrained"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16"}


class PretrainedError(DataError):
    """A missing, corrupt or mismatched export; the message names the file and tensor."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the single-device model for `cfg` has (no memory used)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_tensors(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, where) -> None:
    """Missing, unexpected or wrongly shaped tensors against the model of `cfg`.

    `where(name)` says which file holds (or should hold) a tensor, for the message.
    """
    want = expected_shapes(cfg)
    for name in want:
        if name not in shapes:
            raise PretrainedError(f"{where(name)}: tensor {name!r} is missing (the model needs it)")
    for name, shape in shapes.items():
        if name not in want:
            raise PretrainedError(f"{where(name)}: unexpected tensor {name!r} (not in the model)")
        if tuple(shape) != want[name]:
            raise PretrainedError(
                f"{where(name)}: tensor {name!r} has shape {list(shape)}, "
                f"the model needs {list(want[name])}"
            )


def read_config(path) -> dict:
    """The parsed `config.json` of an export, its format and version checked."""
    cfg_path = Path(path) / CONFIG_NAME
    try:
        meta = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise PretrainedError(f"{cfg_path}: missing; {path} is not a switchall export") from None
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{cfg_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise PretrainedError(f"{cfg_path}: format {found!r} is not {FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise PretrainedError(
            f"{cfg_path}: format_version {version!r}; this switchall reads versions "
            f"1..{FORMAT_VERSION} (a newer switchall wrote it?)"
        )
    for key in ("model", "weights", "tokenizer"):
        if not isinstance(meta.get(key), dict):
            raise PretrainedError(f"{cfg_path}: {key}: missing or not a mapping")
    return meta


def model_config(meta: dict, cfg_path: Path) -> ModelConfig:
    try:
        cfg = from_dict(ModelConfig, meta["model"], prefix="model")
        validate_tree(cfg, "model")
    except ConfigError as e:
        raise PretrainedError(f"{cfg_path}: {e}") from None
    return cfg


class PretrainedReader:
    """Lazy access to an export's tensors: `get_slice(name)[rows]` reads only those bytes.

    `verify=True` also checks every weight file's sha256 (reads each file once); sizes are
    always checked. Use as a context manager, or call `close()`.
    """

    def __init__(self, path, *, verify: bool = False):
        self.path = Path(path)
        self.meta = read_config(self.path)
        self.config = model_config(self.meta, self.path / CONFIG_NAME)
        files = self.meta["weights"].get("files")
        if not isinstance(files, dict) or not files:
            raise PretrainedError(f"{self.path / CONFIG_NAME}: weights.files lists no file")
        self._handles: dict[str, object] = {}
        self.weight_map: dict[str, str] = {}
        for fname, entry in files.items():
            self._check_file(fname, entry, verify)
            for name in self._open(fname).keys():
                if name in self.weight_map:
                    raise PretrainedError(
                        f"{self.path / fname}: tensor {name!r} is also in {self.weight_map[name]}"
                    )
                self.weight_map[name] = fname
        self._check_index(files)

    def _check_file(self, fname: str, entry, verify: bool) -> None:
        p = self.path / fname
        if Path(fname).name != fname:  # only files of the export itself, never a path out of it
            raise PretrainedError(f"{self.path / CONFIG_NAME}: weight file name {fname!r}")
        if not p.is_file():
            raise PretrainedError(f"{p}: missing weight file (listed in {CONFIG_NAME})")
        if not isinstance(entry, dict) or p.stat().st_size != entry.get("bytes"):
            want = entry.get("bytes") if isinstance(entry, dict) else None
            raise PretrainedError(
                f"{p}: {p.stat().st_size} bytes, {CONFIG_NAME} says {want}; the file is "
                "truncated or corrupt"
            )
        if verify and sha256_file(p) != entry.get("sha256"):
            raise PretrainedError(f"{p}: sha256 differs from {CONFIG_NAME}; the file is corrupt")

    def _check_index(self, files: dict) -> None:
        index_name = self.meta["weights"].get("index")
        if index_name is None:
            return
        index_path = self.path / index_name
        try:
            listed = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PretrainedError(f"{index_path}: unreadable index ({e!r})") from None
        for name, fname in listed.items():
            if self.weight_map.get(name) != fname:
                raise PretrainedError(
                    f"{self.path / str(fname)}: tensor {name!r} listed in {index_name} "
                    "is not in that file"
                )
        for name, fname in self.weight_map.items():
            if name not in listed:
                raise PretrainedError(
                    f"{self.path / fname}: tensor {name!r} is not listed in {index_name}"
                )

    def _open(self, fname: str):
        if fname not in self._handles:
            try:
                self._handles[fname] = safe_open(str(self.path / fname), framework="pt")
            except Exception as e:
                raise PretrainedError(
                    f"{self.path / fname}: not a safetensors file ({e})"
                ) from None
        return self._handles[fname]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def where(self, name: str) -> Path:
        """The file holding `name`, or for a missing tensor the file that should list it."""
        if name in self.weight_map:
            return self.path / self.weight_map[name]
        return self.path / (self.meta["weights"].get("index") or WEIGHTS_NAME)

    def file_of(self, name: str) -> Path:
        if name not in self.weight_map:
            raise PretrainedError(f"{self.path}: no tensor {name!r} in the export")
        return self.path / self.weight_map[name]

    def get_slice(self, name: str):
        """safetensors' lazy slice: `.get_shape()`, and indexing (`[a:b]`, `[:, a:b]`) reads
        only the indexed part from disk."""
        return self._open(self.file_of(name).name).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get_slice(name).get_shape())

    def get_tensor(self, name: str) -> torch.Tensor:
        try:
            return self._open(self.file_of(name).name).get_tensor(name)
        except PretrainedError:
            raise
        except Exception as e:
            raise PretrainedError(
                f"{self.file_of(name)}: tensor {name!r} unreadable ({e})"
            ) from None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> PretrainedReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_pretrained(path, *, verify: bool = False) -> PretrainedReader:
    """Open an export for lazy, per-tensor and per-slice reads (e.g. one rank's shard)."""
    return PretrainedReader(path, verify=verify)
