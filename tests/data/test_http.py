"""Streaming shards over HTTP (from a server on 127.0.0.1 that the test starts) and `pipe:`
commands: the same batches as from local files, retries after a connection dropped mid-shard,
and a clear error when a source stays unreachable."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from switchall.data_pipeline import DataError, TokenLoader, read_manifest
from switchall.data_pipeline import manifest as manifest_mod
from tests.data.helpers import Server, global_stream

GBS, T = 16, 64
pytestmark = pytest.mark.timeout(120)


def stream(location, n: int, **kw) -> list[torch.Tensor]:
    return global_stream([TokenLoader(location, global_batch_size=GBS, seq_len=T, **kw)], n)


def test_http_stream_equals_local(small_ds):
    local = stream(small_ds, 30, mode="contiguous")
    with Server(small_ds) as server:
        assert read_manifest(server.url).fingerprint == read_manifest(small_ds).fingerprint
        remote = stream(server.url, 30, mode="contiguous", num_workers=2)
        manifest_url = stream(f"{server.url}/manifest.json", 30, mode="contiguous")
    assert all(torch.equal(a, b) for a, b in zip(local, remote, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(local, manifest_url, strict=True))


def test_connection_dropped_mid_shard_is_retried(small_ds, caplog):
    local = stream(small_ds, 30)
    with Server(small_ds, dropping=True) as server, caplog.at_level(logging.WARNING):
        remote = stream(server.url, 30, retry_delay=0.01)
        dropped = set(server.httpd.RequestHandlerClass.func.dropped)
    assert all(torch.equal(a, b) for a, b in zip(local, remote, strict=True))
    assert len(dropped) >= 2  # several shards arrived cut in half at first
    assert "retrying shard" in caplog.text and "(transfer cut short)" in caplog.text


def test_stalled_transfer_times_out_and_is_retried(small_ds, caplog, monkeypatch):
    """A server that stops sending mid-shard is given up on after HTTP_STALL_SECONDS (not
    waited on forever), and the shard is fetched again."""
    monkeypatch.setattr(manifest_mod, "HTTP_STALL_SECONDS", 1)
    local = stream(small_ds, 4)
    with Server(small_ds, stalling=True) as server, caplog.at_level(logging.WARNING):
        remote = stream(server.url, 4, retry_delay=0.01)
        stalled = set(server.httpd.RequestHandlerClass.func.dropped)
    assert all(torch.equal(a, b) for a, b in zip(local, remote, strict=True))
    assert stalled and "retrying shard" in caplog.text and "(timed out)" in caplog.text


def test_missing_curl_is_named(small_ds, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with Server(small_ds) as server, pytest.raises(DataError, match="needs the curl command"):
        read_manifest(server.url)


def test_unreachable_source_fails_clearly(small_ds, tmp_path):
    with Server(small_ds) as server:
        url = server.url
    with pytest.raises(DataError, match=rf"{url}/manifest.json unreachable after 2.*refused"):
        read_manifest(url, retries=1)

    ds = shutil.copytree(small_ds, tmp_path / "ds")
    name = read_manifest(ds).shards("train")[0].name
    (ds / name).unlink()
    with Server(ds) as server:
        loader = TokenLoader(
            server.url, global_batch_size=GBS, seq_len=T, retries=2, retry_delay=0.01
        )
        with pytest.raises(DataError, match=rf"shard {name}: .*{name} unreachable after 3.*HTTP"):
            for _ in range(loader.batches_per_epoch):
                loader.batch(_)


def test_retry_count_and_backoff(small_ds):
    """retries=2: a shard the server keeps refusing (503) is asked for exactly 3 times, the
    waits between the requests doubling from retry_delay (0.3 s, then 0.6 s)."""
    name = read_manifest(small_ds).shards("train")[0].name
    delay = 0.3
    with Server(small_ds, failing={f"/{name}"}) as server:
        loader = TokenLoader(
            server.url, global_batch_size=GBS, seq_len=T, retries=2, retry_delay=delay
        )
        with pytest.raises(DataError, match=rf"shard {name}: .*unreachable after 3 attempts"):
            for k in range(loader.batches_per_epoch):
                loader.batch(k)
        times = [t for path, t in server.requests if path == f"/{name}"]
        manifests = [path for path, _ in server.requests if path == "/manifest.json"]
    assert len(manifests) == 1  # fetched once, it never failed
    assert len(times) == 3, times
    first, second = times[1] - times[0], times[2] - times[1]
    # Lower bounds are exact (the sleeps); curl's start-up adds to each wait.
    assert first >= delay and second >= 2 * delay, (first, second)
    assert second - first >= 0.5 * delay, (first, second)  # doubling, not a constant wait


def test_pipe_location(small_ds):
    local = stream(small_ds, 10)
    piped = stream(f"pipe:cat {small_ds}/{{}}", 10, num_workers=1)
    assert all(torch.equal(a, b) for a, b in zip(local, piped, strict=True))
