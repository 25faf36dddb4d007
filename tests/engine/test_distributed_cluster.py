"""The Ray path on a two-node `ray.cluster_utils.Cluster`: removing the worker node mid-run still
yields every id exactly once (Ray restarts the lost actor and recomputes lost blocks)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from starcast.engine.run import run

from tests.engine.test_distributed import shards

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")


@pytest.fixture
def two_nodes():
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker = cluster.add_node(num_cpus=2)
    from starcast.engine.distributed import RUNTIME_ENV

    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR", runtime_env=RUNTIME_ENV)
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
    out = tmp_path / "out"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(
        run(cat, out, model=bundle, batch_size=10, ray="auto", progress=False)))
    runner.start()
    deadline = time.monotonic() + 120
    while not list((out / "markers").glob("*.done")) and runner.is_alive():
        assert time.monotonic() < deadline, "no file completed in 120 s"
        time.sleep(0.01)
    assert runner.is_alive(), "the run ended before the node could be removed"
    done_before = len(list((out / "markers").glob("*.done")))
    cluster.remove_node(worker)
    runner.join(timeout=300)
    assert not runner.is_alive()

    assert done_before < len(sizes)
    assert result["totals"]["files_failed"] == 0 and result["totals"]["rows_out"] == sum(sizes)
    ids = pa.concat_tables(pq.read_table(p) for p in sorted((out / "results").glob("*.parquet")))["id"]
    assert sorted(ids.to_pylist()) == list(range(sum(sizes)))
