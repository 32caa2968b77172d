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


# --- only layouts the engine runs (issue 14, row 13) ---------------------------------------------------------------

def _plan(model: str, gpus: str, nodes: int = 1, engine_only: bool = True, **req):
    from shardserve.planner.hardware import parse_gpus
    from shardserve.planner.memory import ModelSpec
    from shardserve.planner.model_presets import get_model_preset
    from shardserve.planner.recommend import make_plan
    from shardserve.planner.search import Request
    return make_plan(ModelSpec.from_config(get_model_preset(model)), parse_gpus(gpus, nodes=nodes), Request(**req),
                     engine_only=engine_only)


def test_moe_on_many_gpus_never_gets_ep_across_replicas():
    """The what-if planner prices ep = k x tp (experts over k DP replicas); the engine keeps ep within a replica's
    TP group, so --plan auto never considers it."""
    for model in ("Mixtral-8x7B", "Qwen3-30B-A3B", "Qwen1.5-MoE-A2.7B"):
        free = _plan(model, "8xH100", engine_only=False)
        assert any(lay.ep > lay.tp for lay in free.layouts)  # the what-if search does propose it
        plan = _plan(model, "8xH100")
        assert plan.recommended is not None and plan.layouts
        assert all(lay.ep in (1, lay.tp) for lay in plan.layouts)
        assert any("replicas" in why for shape, why in plan.excluded if shape[3] > shape[0])


def test_moe_without_ep_needs_expert_widths_that_divide_tp():
    from shardserve.planner.memory import ModelSpec
    from shardserve.planner.model_presets import get_model_preset
    spec = ModelSpec.from_config(get_model_preset("Qwen1.5-MoE-A2.7B"))
    plan = _plan("Qwen1.5-MoE-A2.7B", "8xH100")
    for lay in plan.layouts:
        if lay.ep == 1:
            assert spec.moe_intermediate_size % lay.tp == 0
            assert spec.shared_expert_intermediate_size % lay.tp == 0


def test_never_multi_node():
    plan = _plan("Llama-3.1-405B", "8xH100", nodes=2)
    assert not plan.layouts and plan.recommended is None
    assert all("one node" in why for _, why in plan.excluded if "span nodes" not in why)
    assert plan.smallest_cluster is None or plan.smallest_cluster.nodes == 1
    assert "one node" in (plan.message or "")
    small = _plan("Llama-3.1-70B", "1xRTX-4090")  # nothing fits on one GPU: the suggestion is one node
    assert small.smallest_cluster is not None and small.smallest_cluster.nodes == 1


def test_never_an_unsupported_quantization():
    import pytest

    from shardserve.planner.hardware import PlannerError
    for dtype in ("int8", "fp8"):
        with pytest.raises(PlannerError, match="does not run"):
            _plan("Llama-3.1-8B", "2xH100", dtype=dtype, kv_dtype=dtype)
    with pytest.raises(PlannerError, match="KV cache"):
        _plan("Llama-3.1-8B", "2xH100", dtype="bf16", kv_dtype="fp8")
    assert _plan("Llama-3.1-8B", "2xH100", dtype="fp8", kv_dtype="fp8", engine_only=False).recommended


def test_apply_auto_plan_uses_the_engine_dtype_and_says_what_it_considered(monkeypatch):
    from shardserve.planner.hardware import parse_gpus
    from shardserve.planner.model_presets import get_model_preset
    from shardserve.planner.topology import Topology
    seen = {}
    real = local.recommend_for_local_gpus
    monkeypatch.setattr(local, "local_cluster", lambda topology=None: (parse_gpus("8xH100"), Topology()))
    monkeypatch.setattr(local, "recommend_for_local_gpus",
                        lambda cfg, **kw: seen.update(kw) or real(cfg, **kw))
    eargs = EngineArgs()
    lines = apply_auto_plan(eargs, get_model_preset("Mixtral-8x7B"), environ={})  # torch_dtype bfloat16
    assert seen["dtype"] == "bf16"
    assert any("only layouts this engine runs" in line for line in lines)
    assert not eargs.enable_expert_parallel or eargs.tensor_parallel_size > 1
    fp32 = EngineArgs(dtype="float32", tensor_parallel_size=2)
    lines = apply_auto_plan(fp32, get_model_preset("Llama-3.1-8B"), environ={})
    assert fp32.tensor_parallel_size == 2 and "float32" in lines[-1]


# --- the user's CUDA_VISIBLE_DEVICES -----------------------------------------------------------------------------

def test_devices_map_back_through_the_users_list():
    from shardserve.planner.local import visible_devices_for
    assert visible_devices_for([0, 1], ["3", "1", "2"]) == "3,1"
    assert visible_devices_for([1, 0], ["3", "1", "2"]) == "1,3"
    assert visible_devices_for([2, 0], ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]) == "GPU-cccc,GPU-aaaa"
    assert visible_devices_for([1, 0], None) == "1,0"


def test_plan_keeps_the_users_cuda_visible_devices(monkeypatch):
    """CUDA_VISIBLE_DEVICES=3,1,2: the planner works on torch's 0,1,2 and writes back the user's ids, not 0,1,2;
    CUDA_DEVICE_ORDER is set to PCI_BUS_ID when unset and kept when set."""
    from shardserve.planner.hardware import parse_gpus
    from shardserve.planner.model_presets import get_model_preset
    from shardserve.planner.topology import Topology
    monkeypatch.setattr(local, "local_cluster", lambda topology=None: (parse_gpus("3xH100"), Topology()))
    env = {"CUDA_VISIBLE_DEVICES": "3,1,2"}
    eargs = EngineArgs()
    lines = apply_auto_plan(eargs, get_model_preset("Llama-3.1-8B"), environ=env)
    assert sorted(env["CUDA_VISIBLE_DEVICES"].split(",")) == ["1", "2", "3"]
    assert env["CUDA_VISIBLE_DEVICES"] == "3,1,2"  # unknown topology: the user's order is kept
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and any("CUDA_VISIBLE_DEVICES=3,1,2" in x for x in lines)
    env = {"CUDA_VISIBLE_DEVICES": "3,1,2", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    apply_auto_plan(EngineArgs(), get_model_preset("Llama-3.1-8B"), environ=env)
    assert env["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_a_two_device_plan_of_three_visible_gives_the_users_first_two(monkeypatch):
    """A plan that selects torch devices 0 and 1 out of CUDA_VISIBLE_DEVICES=3,1,2 becomes "3,1"."""
    from shardserve.planner.hardware import parse_gpus
    from shardserve.planner.search import Layout, MemoryPerDevice
    from shardserve.planner.topology import Topology
    monkeypatch.setattr(local, "local_cluster", lambda topology=None: (parse_gpus("3xH100"), Topology()))
    layout = Layout(2, 1, 1, 1, True, MemoryPerDevice(0, 0, 0, 0, 0), 1, device_order=[0, 1])
    monkeypatch.setattr(local, "recommend_for_local_gpus", lambda cfg, **kw: layout)
    env = {"CUDA_VISIBLE_DEVICES": "3,1,2"}
    eargs = EngineArgs()
    apply_auto_plan(eargs, tiny_model_config() | {"torch_dtype": "bfloat16"}, environ=env)
    assert env["CUDA_VISIBLE_DEVICES"] == "3,1" and eargs.tensor_parallel_size == 2


def test_topology_is_renumbered_for_the_visible_devices():
    """nvidia-smi numbers every GPU in PCI bus order; torch numbers the visible ones in CUDA_VISIBLE_DEVICES
    order. GPU0-GPU2 and GPU1-GPU3 are NVLink pairs; with CUDA_VISIBLE_DEVICES=3,1,2 torch's 0 and 1 are the
    pair 3-1, and UUIDs resolve through nvidia-smi's list."""
    from shardserve.planner.local import visible_topology
    from shardserve.planner.topology import Topology, order_for_tp
    nv = {(0, 2), (2, 0), (1, 3), (3, 1)}
    topo = Topology(num_gpus=4, links={(i, j): "NV4" if (i, j) in nv else "SYS"
                                       for i in range(4) for j in range(4) if i != j})
    vis = visible_topology(topo, ["3", "1", "2"], 3)
    assert vis.num_gpus == 3 and vis.is_nvlink(0, 1) and not vis.is_nvlink(1, 2) and not vis.is_nvlink(0, 2)
    assert order_for_tp(vis, 2, [0, 1, 2])[:2] == [0, 1]
    uuids = {"GPU-aaaa-1": 0, "GPU-bbbb-2": 1, "GPU-cccc-3": 2, "GPU-dddd-4": 3}
    by_uuid = visible_topology(topo, ["GPU-dddd-4", "GPU-bbbb"], 2, uuids=lambda: uuids)
    assert by_uuid.num_gpus == 2 and by_uuid.is_nvlink(0, 1)
    assert not visible_topology(topo, ["MIG-xyz"], 1, uuids=lambda: uuids).known
    assert visible_topology(topo, None, 4).links == topo.links
