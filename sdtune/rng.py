"""Every RNG a training step may draw from (torch, CUDA, NumPy, Python), saved in and restored from a checkpoint.

Lightning's checkpoints hold no RNG state; an exact resume needs each rank's. States are NumPy arrays and
plain values, so they cross ranks through `all_gather_object` and are stored as safetensors + JSON.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from sdtune.distributed import gather_objects

KEY = "rng_states"


def capture() -> dict[str, Any]:
    """This process's RNG states."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state().numpy(),
        "cuda": [s.numpy() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].copy(), *np_state[2:]],
        "python": random.getstate(),
    }


def restore(states: dict[str, Any]) -> None:
    torch.set_rng_state(torch.as_tensor(states["torch"]))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s) for s in states["cuda"]])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.asarray(keys), *rest))
    random.setstate(states["python"])


def save_to(checkpoint: dict[str, Any]) -> None:
    """Every rank's states, in rank order (call on every rank: it is a collective)."""
    checkpoint[KEY] = gather_objects(capture())


def load_from(checkpoint: dict[str, Any], rank: int) -> None:
    """Restore `rank`'s states (the data layout check refuses a different world size)."""
    states = checkpoint.get(KEY)
    if isinstance(states, list):
        states = states[rank] if rank < len(states) else states[0]
    if states:
        restore(states)
