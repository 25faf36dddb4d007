"""The Ray path on a simulated cluster (`ray.cluster_utils.Cluster`): removing a node that holds work
mid-run still yields every id exactly once, with the same numbers (Ray restarts the lost actors and
recomputes lost blocks). The head has no CPU, so only the two worker nodes run the job's workers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.engine.test_distributed import (
    assert_every_id_once,
    assert_same_results,
    run_interrupted,
    shards,
    worker_tasks_finished,
)

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")


@pytest.fixture
def cluster():
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"task_events_report_interval_ms": 100}})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    cluster.wait_for_nodes()
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_removing_a_node_that_holds_work_mid_run_yields_every_id_once(tmp_path: Path, cluster) -> None:
    from starcast.engine.run import run

    from tests.engine.conftest import make_bundle

    cluster, (doomed, survivor) = cluster
    bundle = make_bundle(tmp_path / "tiny-test")
    sizes = [400] * 16
    cat = shards(tmp_path / "cat", sizes)
    local = run(cat, tmp_path / "local", model=bundle, batch_size=10, progress=False)

    def doomed_node_busy() -> int:  # tasks of this run finished on the node to remove
        return sum(n for (node, _), n in worker_tasks_finished().items() if node == doomed.node_id)

    done_before, result = run_interrupted(cat, tmp_path / "out", bundle, doomed_node_busy,
                                          lambda _: cluster.remove_node(doomed))
    assert done_before < len(sizes)
    assert_every_id_once(tmp_path / "out", result, sizes)
    assert result["totals"] == local["totals"]
    assert_same_results(tmp_path / "local", tmp_path / "out", [f.stem for f in sorted(cat.glob("*.parquet"))])
    finished = worker_tasks_finished()
    assert any(node == survivor.node_id for node, _ in finished), "the surviving node did no work"


def test_the_gpu_layout_gives_the_local_numbers(tmp_path: Path) -> None:
    """A node that advertises one GPU gets the GPU layout (read tasks preparing on the CPUs, one
    inference actor holding the GPU); on this machine the actor infers on the CPU, with the same
    rows and numbers as a local run."""
    from starcast.engine.run import run

    from tests.engine.conftest import make_bundle

    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 1, "_system_config": {"task_events_report_interval_ms": 100}})
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        bundle = make_bundle(tmp_path / "tiny-test")
        sizes = [150, 0, 333]
        cat = shards(tmp_path / "cat", sizes)
        local = run(cat, tmp_path / "local", model=bundle, batch_size=50, progress=False)
        remote = run(cat, tmp_path / "out", model=bundle, batch_size=50, ray="auto", progress=False)
        time.sleep(1)  # task events reach the GCS every 100 ms
        used = {(e.task_info.func_or_class_name, "GPU" in e.task_info.required_resources)
                for e in ray._private.state.state._get_all_task_events()}
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert ("_map_task", False) in used  # the read tasks: plain Ray Data tasks, without a GPU
    assert ("MapWorker(MapBatches(Worker)).__init__", True) in used  # the actor that holds the GPU
    assert remote["totals"] == local["totals"]
    assert_every_id_once(tmp_path / "out", remote, sizes)
    assert_same_results(tmp_path / "local", tmp_path / "out", [f.stem for f in sorted(cat.glob("*.parquet"))])
