"""The Ray path on a two-node `ray.cluster_utils.Cluster`: removing the worker node mid-run still
yields every id exactly once (Ray restarts the lost actor and recomputes lost blocks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.test_distributed import assert_every_id_once, run_interrupted, shards

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")


@pytest.fixture
def two_nodes():
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker = cluster.add_node(num_cpus=2)

    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def test_removing_a_node_mid_run_yields_every_id_once(tmp_path: Path, two_nodes) -> None:
    from tests.engine.conftest import make_bundle

    cluster, worker = two_nodes
    bundle = make_bundle(tmp_path / "tiny-test")
    sizes = [200] * 12
    cat = shards(tmp_path / "cat", sizes)
    done_before, result = run_interrupted(cat, tmp_path / "out", bundle, lambda: cluster.remove_node(worker))
    assert done_before < len(sizes)
    assert_every_id_once(tmp_path / "out", result, sizes)
