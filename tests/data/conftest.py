"""Session fixtures for the data-pipeline tests. Byte-level datasets need no tokenizer training,
so most tests use them; the sentencepiece path is covered with a tiny vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.helpers import make_dataset, write_corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), 60)


@pytest.fixture(scope="session")
def byte_ds(tmp_path_factory, corpus_dir) -> Path:
    """About 150k byte tokens in ~37 shards of 4096 tokens (val: ~5% of the documents)."""
    return make_dataset(tmp_path_factory.mktemp("byte_ds"), [str(corpus_dir)])


@pytest.fixture(scope="session")
def small_ds(tmp_path_factory) -> Path:
    """About 30k byte tokens in shards of 1024, so that an epoch is a few dozen batches."""
    corpus = write_corpus(tmp_path_factory.mktemp("small_corpus"), 12, seed=1)
    return make_dataset(tmp_path_factory.mktemp("small_ds"), [str(corpus)], shard_tokens=1024)
