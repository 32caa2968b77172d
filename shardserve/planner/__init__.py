"""The planner: memory estimates, a performance model, and the best parallel layout for a model and a cluster."""

from shardserve.planner.hardware import Cluster, GPUSpec, PlannerError, get_gpu, parse_gpus
from shardserve.planner.local import recommend_for_local_gpus
from shardserve.planner.memory import ModelSpec, kv_bytes_per_token, load_model_config, total_params
from shardserve.planner.model_presets import get_model_preset, model_preset_names
from shardserve.planner.recommend import Plan, make_plan
from shardserve.planner.search import Layout, Request

__all__ = [
    "Cluster", "GPUSpec", "Layout", "ModelSpec", "Plan", "PlannerError", "Request", "get_gpu", "get_model_preset",
    "kv_bytes_per_token", "load_model_config", "make_plan", "model_preset_names", "parse_gpus",
    "recommend_for_local_gpus", "total_params",
]
