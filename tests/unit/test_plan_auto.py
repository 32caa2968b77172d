"""`serve --plan auto`: the planner's recommendation becomes the engine layout (with a faked GPU machine), and on a
machine without GPUs the flags are kept."""
from __future__ import annotations

from shardserve.engine.args import EngineArgs
from shardserve.models.tiny import tiny_model_config
from shardserve.planner import local
from shardserve.planner.local import apply_auto_plan


def test_without_gpus_the_flags_stay(monkeypatch):
    monkeypatch.setattr(local, "local_cluster", lambda topology=None: None)
    eargs = EngineArgs(tensor_parallel_size=2)
    lines = apply_auto_plan(eargs, tiny_model_config(), environ={})
    assert eargs.tensor_parallel_size == 2 and "no CUDA GPUs" in lines[0]


def test_recommendation_is_applied_with_gpu_order(monkeypatch):
    """8 fake H100s where NVLink pairs are (0,4), (1,5), (2,6), (3,7): a 70B model gets tp > 1 and the GPU order
    puts each TP group on NVLink neighbours."""
    from shardserve.planner.hardware import parse_gpus
    from shardserve.planner.model_presets import get_model_preset
    from shardserve.planner.topology import Topology
    nv = {}
    for a, b in [(0, 4), (1, 5), (2, 6), (3, 7)]:
        nv[(a, b)] = nv[(b, a)] = "NV18"
    links = {(i, j): nv.get((i, j), "SYS") for i in range(8) for j in range(8) if i != j}
    topo = Topology(num_gpus=8, links=links)
    monkeypatch.setattr(local, "local_cluster", lambda topology=None: (parse_gpus("8xH100"), topo))
    eargs = EngineArgs()
    env: dict = {}
    lines = apply_auto_plan(eargs, get_model_preset("llama-2-70b"), environ=env)
    assert lines[0].startswith("--plan auto: tp=")
    tp = eargs.tensor_parallel_size
    assert tp * eargs.pipeline_parallel_size * eargs.data_parallel_size == 8 and tp > 1
    order = [int(x) for x in env["CUDA_VISIBLE_DEVICES"].split(",")]
    assert sorted(order) == list(range(8))
    if tp == 2:  # each consecutive pair of ranks is an NVLink pair
        assert all(links[(order[i], order[i + 1])] == "NV18" for i in range(0, 8, 2))
