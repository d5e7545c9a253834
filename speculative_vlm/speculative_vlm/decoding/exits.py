"""Early-exit heads: turn an intermediate decoder layer's hidden state into next-token logits.

The default head of every exit layer is the target's own final norm + LM head (shared,
untrained). A trained exit adds a small adapter per layer in front of that shared head:
``h + W2 silu(W1 norm(h))``, zero-initialised so that an untrained adapter is exactly the
default head. ``speculative-vlm train-exits`` trains the adapters by self-distillation and
writes a checkpoint that :func:`load_exit_heads` reads.

Exit heads run where the target runs: :func:`load_exit_heads` puts the adapters on the
target's device in its dtype (a checkpoint is saved from float32 on the CPU), and an adapter
is applied in its own dtype, so adapters being trained in float32 next to a bfloat16 target work too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from speculative_vlm.decoding import model_store
from speculative_vlm.decoding.models import ModelAdapter, RowsHead


class ExitCheckpointMismatch(ValueError):
    """An exit checkpoint was trained for another model shape or other layers."""


class ExitAdapter(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)
        nn.init.zeros_(self.down.weight)  # starts as the identity: the default head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.down(nn.functional.silu(self.up(self.norm(hidden))))


class ExitHeads(nn.Module):
    """Exit heads for a set of layers; ``adapters`` may be empty (the shared head only)."""

    def __init__(self, target: ModelAdapter, layers, adapters: dict[int, ExitAdapter] | None = None):
        super().__init__()
        layers = sorted(set(int(layer) for layer in layers))
        for layer in layers:
            if not 0 <= layer < target.num_layers - 1:
                raise ValueError(
                    f"exit layer {layer} is out of range; the target has layers 0..{target.num_layers - 1} "
                    f"and the last one is not an early exit: choose from 0..{target.num_layers - 2}"
                )
        self.layers = layers
        self.adapters = nn.ModuleDict({str(k): v for k, v in (adapters or {}).items()})
        self._head = target.head

    @property
    def trained(self) -> bool:
        return len(self.adapters) > 0

    def logits(self, layer: int, hidden: torch.Tensor, narrow: RowsHead | None = None) -> torch.Tensor:
        """The exit's logits at ``layer``; with ``narrow`` (the pass's narrowed LM head), for its
        tokens only (the rest -inf)."""
        adapter = self.adapters[str(layer)] if str(layer) in self.adapters else None
        if adapter is not None:
            hidden = adapter(hidden.to(adapter.norm.weight.dtype))
        return self._head(hidden, narrow)


def save_exit_heads(heads: ExitHeads, path: str | os.PathLike, target: ModelAdapter, report: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": "speculative_vlm.exits/1",
            "target": target.name,
            "hidden_size": target.hidden_size,
            "num_layers": target.num_layers,
            "layers": list(heads.layers),
            "inner": {k: a.up.out_features for k, a in heads.adapters.items()},
            "state": {k: a.state_dict() for k, a in heads.adapters.items()},
            "report": report or {},
        },
        path,
    )
    return path


def load_exit_heads(path: str | os.PathLike, target: ModelAdapter, layers=None) -> ExitHeads:
    """Load trained exit adapters onto the target's device, in its dtype; ``layers`` (optional)
    must be a subset of the trained ones."""
    path = model_store.resolve_file(path)
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data.get("hidden_size") != target.hidden_size or data.get("num_layers") != target.num_layers:
        raise ExitCheckpointMismatch(
            f"exit checkpoint {path} was trained for a target with {data.get('num_layers')} layers of "
            f"width {data.get('hidden_size')}, not {target.num_layers} x {target.hidden_size}; "
            "run `speculative-vlm train-exits` for this target"
        )
    trained = [int(k) for k in data["state"]]
    layers = trained if layers is None else [int(x) for x in layers]
    missing = sorted(set(layers) - set(trained))
    if missing:
        raise ExitCheckpointMismatch(
            f"exit checkpoint {path} has adapters for layers {sorted(trained)}, not {missing}; "
            "train those layers or leave them out of --exit-layers"
        )
    adapters = {}
    for layer in layers:
        a = ExitAdapter(target.hidden_size, int(data["inner"][str(layer)]))
        a.load_state_dict(data["state"][str(layer)])
        adapters[layer] = a.to(device=target.device, dtype=target.dtype).eval()
    return ExitHeads(target, layers, adapters)
