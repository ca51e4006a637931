"""`manifest.json`: what a prepared dataset holds, and where each of its files is.

A dataset location is a local directory, a `file://` or `http(s)://` URL of one, the URL of
`manifest.json` itself, or a template with `{}` standing for a file name (for example
`pipe:aws s3 cp s3://bucket/ds/{} -`). Files are opened with `webdataset.gopen`, so every
scheme webdataset knows works; remote reads are retried (see `fetch`). HTTP(S) goes through our
own `curl` command line rather than webdataset's, which retries 30 times inside curl and never
gives up on a server that stops sending.

The manifest is written last, atomically, by `switchall prepare`: a directory without one is an
unfinished dataset. It holds no timestamps, so preparing the same inputs twice gives the same
bytes; the inputs are recorded as given (`source`), and `Manifest.fingerprint`, which leaves
them out, identifies the token content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

FORMAT = "switchall.tokens"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.model"
# The names `switchall prepare` writes; a manifest naming anything else is refused, since
# names end up in paths, URLs and `pipe:` shell commands.
SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
SHARD_NAME = "{split}-{index:06d}.tar"
_SHARD_NAME = re.compile(r"^(?P<split>[a-z][a-z0-9_]{0,31})-(?P<index>\d{6})\.tar$")
log = logging.getLogger("switchall.data")
# curl gives up on a transfer that has sent under 1 byte/s for this long (a hung server).
HTTP_STALL_SECONDS = 60
HTTP_CONNECT_TIMEOUT_SECONDS = 30


class DataError(ValueError):
    """Bad or unreachable data: the message names the manifest, shard or input file at fault."""


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard of a split, as listed in the manifest."""

    name: str
    tokens: int
    documents: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A parsed `manifest.json`. `location` is where it was read from; the rest is its content."""

    location: str
    format_version: int
    vocab_size: int
    eod_id: int
    dtype: str
    shard_tokens: int
    tokenizer: dict[str, Any]
    splits: dict[str, tuple[ShardInfo, ...]]
    source: dict[str, Any]
    fingerprint: str
    """sha256 of the manifest's canonical JSON less `source` (the inputs as named on the
    preparing machine): changes whenever any token of the dataset does, but not when the same
    corpus is prepared again from another directory (a checkpoint then resumes on it)."""

    def shards(self, split: str) -> tuple[ShardInfo, ...]:
        if split not in self.splits:
            raise DataError(
                f"{self.manifest_url}: no split {split!r} (it has {', '.join(self.splits)})"
            )
        return self.splits[split]

    def num_tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.shards(split))

    def url(self, name: str) -> str:
        return resolve(self.location, name)

    @property
    def manifest_url(self) -> str:
        return resolve(self.location, MANIFEST_NAME)

    @property
    def byte_level(self) -> bool:
        return self.tokenizer.get("type") == "byte"


def resolve(location: str, name: str) -> str:
    """The URL or path of file `name` of the dataset at `location`.

    In a `pipe:` template the name is shell-quoted: webdataset runs the command with a shell.
    (Names from a manifest are also checked against the writer's patterns; this is the second
    line of defence.)
    """
    if "{}" in location:
        if location.startswith("pipe:"):
            name = shlex.quote(name)
        return location.replace("{}", name)
    if location.endswith(MANIFEST_NAME):
        return location[: -len(MANIFEST_NAME)] + name
    return location.rstrip("/") + "/" + name


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def local_path(url: str) -> Path:
    """The filesystem path of a local URL (a plain path or `file://`)."""
    return Path(url2pathname(urlparse(url).path)) if url.startswith("file:") else Path(url)


def _open(url: str):
    """A binary read stream of `url`: HTTP(S) with bounded curl timeouts, else `gopen`."""
    from webdataset.gopen import Pipe, gopen

    if urlparse(url).scheme not in ("http", "https"):
        return gopen(url, "rb")
    argv = [
        "curl", "--fail", "--silent", "--location", "--retry", "0",
        "--connect-timeout", str(HTTP_CONNECT_TIMEOUT_SECONDS),
        "--speed-limit", "1", "--speed-time", str(HTTP_STALL_SECONDS),
        url,
    ]  # fmt: skip
    try:
        # Exit statuses 141/23 are curl's reader closing early, as webdataset treats them.
        return Pipe(argv, mode="rb", bufsize=8192, ignore_status=[141, 23])
    except FileNotFoundError:
        raise DataError(f"reading {url} needs the curl command, which is not on PATH") from None


def fetch(url: str, what: str, *, retries: int = 3, retry_delay: float = 0.5) -> bytes:
    """All bytes of `url`. Remote sources are retried `retries` times with exponential backoff;
    a local file that is missing fails at once. Errors name `what` and the URL."""
    attempts = 1 if is_local(url) else 1 + max(0, retries)
    reason = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(retry_delay * 2 ** (attempt - 1))
            log.warning(
                "retrying %s (%s), attempt %d/%d: %s", what, url, attempt + 1, attempts, reason
            )
        try:
            # Closing a `pipe:`/curl stream waits for the command and raises on a bad exit status,
            # which is how a connection dropped mid-file shows up.
            with _open(url) as stream:
                return stream.read()
        except FileNotFoundError:
            raise DataError(f"{what}: missing ({url})") from None
        except DataError:
            raise  # not transient (no curl): retrying cannot help
        except (OSError, ValueError) as e:
            reason = _describe(e)
    raise DataError(f"{what}: {url} unreachable after {attempts} attempts: {reason}")


_CURL_EXITS = {
    6: "host not found",
    7: "connection refused",
    18: "transfer cut short",
    22: "HTTP error status",
    28: "timed out",
    52: "empty reply",
    56: "connection reset",
}


def _describe(error: Exception) -> str:
    """A short reason for a failed open/read (webdataset reports a pipe's whole argv)."""
    m = re.search(r"exit (\d+)", str(error))
    if m is None:
        return str(error)
    status = int(m.group(1))
    meaning = _CURL_EXITS.get(status, "") if "curl" in str(error) else ""
    return f"command exited with status {status}" + (f" ({meaning})" if meaning else "")


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _need(tree: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in tree:
        raise DataError(f"{where}: missing field {key!r}")
    value = tree[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise DataError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def parse_manifest(raw: bytes, location: str) -> Manifest:
    """Validate and parse manifest bytes; errors name the manifest and the field."""
    where = resolve(location, MANIFEST_NAME)
    try:
        tree = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        raise DataError(f"{where}: not a switchall token manifest (format is not {FORMAT!r})")
    version = _need(tree, "format_version", int, where)
    if version != FORMAT_VERSION:
        raise DataError(f"{where}: format_version {version}; this code reads {FORMAT_VERSION}")
    dtype = _need(tree, "dtype", str, where)
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"{where}: field 'dtype' must be uint16 or uint32, got {dtype!r}")
    splits: dict[str, tuple[ShardInfo, ...]] = {}
    for split, entry in _need(tree, "splits", dict, where).items():
        if not SPLIT_NAME.match(split):
            raise DataError(f"{where}: bad split name {split!r} (expected e.g. 'train', 'val')")
        if not isinstance(entry, dict):
            raise DataError(f"{where} splits.{split}: expected an object")
        shards = []
        for i, s in enumerate(_need(entry, "shards", list, f"{where} splits.{split}")):
            at = f"{where} splits.{split}.shards[{i}]"
            if not isinstance(s, dict):
                raise DataError(f"{at}: expected an object")
            shards.append(
                ShardInfo(
                    name=_need(s, "name", str, at),
                    tokens=_need(s, "tokens", int, at),
                    documents=_need(s, "documents", int, at),
                    bytes=_need(s, "bytes", int, at),
                    sha256=_need(s, "sha256", str, at),
                )
            )
            m = _SHARD_NAME.match(shards[-1].name)
            if not m or m["split"] != split or int(m["index"]) != i:
                raise DataError(
                    f"{at}: bad shard name {shards[-1].name!r} (this split's shard {i} is "
                    f"{SHARD_NAME.format(split=split, index=i)!r})"
                )
            if shards[-1].tokens <= 0:
                raise DataError(f"{at}: bad token count {shards[-1].tokens}")
        splits[split] = tuple(shards)
    tokenizer = dict(_need(tree, "tokenizer", dict, where))
    _need(tokenizer, "type", str, f"{where} tokenizer")
    _need(tokenizer, "sha256", str, f"{where} tokenizer")
    if tokenizer["type"] == "sentencepiece":
        path = _need(tokenizer, "path", str, f"{where} tokenizer")
        if path != TOKENIZER_NAME:
            raise DataError(f"{where} tokenizer: bad path {path!r} (expected {TOKENIZER_NAME!r})")
        tokenizer["url"] = resolve(location, path)
    return Manifest(
        location=location,
        format_version=version,
        vocab_size=_need(tree, "vocab_size", int, where),
        eod_id=_need(tree, "eod_id", int, where),
        dtype=dtype,
        shard_tokens=_need(tree, "shard_tokens", int, where),
        tokenizer=tokenizer,
        splits=splits,
        source=tree.get("source", {}),
        fingerprint=hashlib.sha256(
            canonical_json({k: v for k, v in tree.items() if k != "source"})
        ).hexdigest(),
    )


def read_manifest(location: str | os.PathLike, *, retries: int = 3) -> Manifest:
    """Read and validate the manifest of the dataset at `location` (see the module docstring)."""
    location = os.fspath(location)
    url = resolve(location, MANIFEST_NAME)
    if is_local(url) and not local_path(url).exists():
        hint = ""
        parent = local_path(url).parent
        if parent.is_dir() and (parent / "prepare_state.json").exists():
            hint = " (an interrupted `switchall prepare`: rerun it to finish)"
        elif parent.is_dir():
            hint = " (run `switchall prepare --out DIR` to make a dataset)"
        raise DataError(f"no dataset at {location}: {url} does not exist{hint}")
    return parse_manifest(fetch(url, "manifest", retries=retries), location)


def manifest_bytes(tree: dict[str, Any]) -> bytes:
    """The on-disk form: sorted keys, so equal content gives equal bytes."""
    return (json.dumps(tree, sort_keys=True, indent=1) + "\n").encode()
