"""What a model needs to know about its place in the mesh: its TP group and its pipeline layer range."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

IntermediateTensors = dict[str, torch.Tensor]  # hidden_states / residual passed between pipeline stages


@dataclass
class ModelShard:
    """This rank's slice of the model: the TP group it splits matrices over and the layers [start, end) it holds."""
    tp: Any  # GroupCoordinator or None for tp = 1
    start_layer: int
    end_layer: int
    is_first_stage: bool = True
    is_last_stage: bool = True
    ep: Any = None                      # expert-parallel group (None: experts are tensor-parallel over `tp`)
    expert_placement: str = "linear"    # "linear" | "round_robin": which experts each EP rank owns

    @classmethod
    def whole(cls, num_layers: int) -> "ModelShard":
        return cls(tp=None, start_layer=0, end_layer=num_layers)

    @property
    def num_local_layers(self) -> int:
        return self.end_layer - self.start_layer


class PPMissingLayer(nn.Identity):
    """Placeholder for a module that lives on another pipeline stage (keeps parameter names aligned with HF)."""
