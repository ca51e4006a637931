"""`train.compile` and `train.activation_checkpointing` under the distributed runtime."""

from __future__ import annotations

import pytest

from tests.parallel.test_parity import assert_matches

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


def test_compiled_checkpointed_expert_parallel_matches_one_process(two_ranks, reference):
    """EP=2 (ZeRO-1) with the model compiled and every block recomputed in backward, the
    σ-MoE all-to-alls replayed inside the recomputation: the eager single process's losses
    and gradient norms, within the parity tolerances."""
    results, _ = two_ranks
    assert_matches(results["ep2_z1_compile_ac"]["history"], reference["switchall"], steps=3)
