"""shardserve: multi-device LLM inference (tensor, pipeline, data, expert parallelism) on CPU and GPU."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):  # lazy: `import shardserve` stays cheap for the CLI and the planner
    if name == "LLM":
        from shardserve.entrypoints.llm import LLM
        return LLM
    if name == "SamplingParams":
        from shardserve.sampling_params import SamplingParams
        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from shardserve import outputs
        return getattr(outputs, name)
    raise AttributeError(name)
