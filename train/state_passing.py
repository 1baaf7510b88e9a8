"""State passing between training batches: ``train.state_passing`` (a training-time state-collapse fix).

    train: {state_passing: carry}        # with data.row_streams: true
    train: {state_passing: noise, state_noise_std: 0.1}

A recurrent layer trained only from a zero state at length L never sees a "full" state and may
collapse past L (Stuffed Mamba, arXiv 2410.07145). Starting each training row from a non-zero
state fixes that in a short continued training (arXiv 2507.02782): the final state of the same
row's previous batch, detached (``carry``: truncated back-propagation through a continuous
stream), or Gaussian noise (``noise``). ``carry`` was the stronger one in that paper.

* Which layers: those whose class sets ``state_passing = True`` (a fixed-size state: Mamba-2);
  every other block starts from its usual (None) state, so attention caches never accumulate.
* Which state goes where: batch i of a rank starts from the final states of the rank's batch
  i - lag, lag = max(1, data.num_workers): workers take strict turns, so that is the previous
  batch of the same reader, whose row b the loader's row streams make row b's continuation.
  The carried state enters whatever the row starts with (its own document's continuation or, at
  a document start in column 0, a new document, as the paper's state from another sequence does);
  documents starting later in the row reset it as always.
* Checkpoints: each rank writes its carried states (and the noise generator) to
  ``state_passing/rank-NNNNN.safetensors`` in the checkpoint, so a resumed run is exact.
* How: forward hooks on the model (only in training mode, so evaluation and decoding are left
  alone) pass ``states=`` and ``return_states=True`` and keep the returned states; the engine's
  forward/backward is untouched. Off (the default) attaches nothing: training is bitwise as before.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hybrid_lm.models.common.mixer import State
from hybrid_lm.train.checkpoint import layout
from hybrid_lm.typed_config import ConfigError

MODES = ("off", "carry", "noise")
SUBDIR = "state_passing"


def check_state_passing(cfg: Any) -> None:
    """Cross-section rules for ``train.state_passing`` (JobConfig.validate); ConfigError names the key."""
    mode = cfg.train.state_passing
    if mode == "off":
        return
    if "M" not in cfg.model.block_pattern:
        raise ConfigError(f"train.state_passing: {mode} needs a layer whose state can be carried (Mamba-2 'M'); "
                          f"model.layer_pattern={cfg.model.layer_pattern!r} has none")
    if mode == "carry" and not cfg.data.row_streams:
        raise ConfigError("train.state_passing: carry needs data.row_streams=true (each row a continuous stream, so "
                          "row b's state goes on with row b's tokens); got data.row_streams=false")
    cfg.parallel.refuse(("tensor_parallel", "pipeline_parallel", "context_parallel"), f"train.state_passing={mode}",
                        "states are carried under data parallelism / ZeRO only")
    recursion = getattr(cfg.model, "recursion", None)
    if getattr(cfg.model, "hmt", None) is not None or (recursion is not None and recursion.loops > 1):
        raise ConfigError(f"train.state_passing: {mode} needs the plain hybrid stack (not HMT or a looped model)")


class StatePassing:
    """The initial states of each training batch, and the carried ones between batches (one rank)."""

    def __init__(self, model: nn.Module, mode: str, *, lag: int = 1, noise_std: float = 0.1, seed: int = 0,
                 rank: int = 0) -> None:
        if mode not in MODES[1:]:
            raise ValueError(f"StatePassing: mode must be carry or noise, got {mode!r}")
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise ConfigError(f"train.state_passing: {mode} needs the hybrid stack (a model with blocks)")
        self.mode, self.lag, self.noise_std = mode, max(1, lag), noise_std
        self.n_blocks = len(blocks)
        self.layers = {i: b.layer for i, b in enumerate(blocks) if getattr(b.layer, "state_passing", False)}
        if not self.layers:
            raise ConfigError(f"train.state_passing: {mode}: no layer of this model carries a fixed-size state")
        self.queue: deque[list[Optional[State]]] = deque()
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        self.dtype = next(model.parameters()).dtype
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after)]

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        if not module.training:
            return None
        ids = args[0] if args else kwargs["input_ids"]
        kwargs = {**kwargs, "states": self.initial(ids.shape[0], ids.device, self.dtype)}
        if self.mode == "carry":
            kwargs["return_states"] = True
        return args, kwargs

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if module.training:
            self.record(output.states)

    def detach(self) -> None:
        """Remove the hooks (the model is called as without state passing again)."""
        for handle in self.handles:
            handle.remove()

    def initial(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Optional[list[Optional[State]]]:
        """The ``states`` argument of this batch's forward (None: every layer from zero)."""
        if self.mode == "carry":
            return self.queue.popleft() if len(self.queue) == self.lag else None
        states: list[Optional[State]] = [None] * self.n_blocks
        for i, layer in self.layers.items():
            state = layer.init_state(batch_size, device=torch.device("cpu"), dtype=dtype)
            for key in getattr(layer, "noise_state_keys", tuple(state)):
                noise = torch.randn(state[key].shape, generator=self.generator, dtype=torch.float32)
                state[key] = noise.to(state[key].dtype) * self.noise_std
            states[i] = {k: v.to(device) for k, v in state.items()}
        return states

    def record(self, states: Optional[list[Optional[State]]]) -> None:
        """Keep this batch's final states (detached) for batch i + lag; nothing to keep for noise."""
        if self.mode != "carry":
            return
        assert states is not None
        self.queue.append([{k: v.detach() for k, v in states[i].items()} if i in self.layers and states[i] is not None
                           else None for i in range(self.n_blocks)])

    @staticmethod
    def path(directory: Path, rank: int) -> Path:
        return Path(directory) / SUBDIR / f"rank-{rank:05d}.safetensors"

    def save(self, directory: Path, rank: int) -> None:
        tensors = {"noise_generator": self.generator.get_state()}
        for slot, states in enumerate(self.queue):
            for i, state in enumerate(states):
                for key, value in (state or {}).items():
                    tensors[f"{slot}.{i}.{key}"] = value.detach().cpu().contiguous()
        path = self.path(directory, rank)
        with layout.writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(path), metadata={"mode": self.mode, "lag": str(self.lag),
                                                    "slots": str(len(self.queue))})

    def load(self, directory: Path, rank: int, device: torch.device) -> None:
        path = self.path(directory, rank)
        if not path.is_file():
            raise layout.CheckpointError(f"{directory}: no carried states ({path.relative_to(directory)}); it was saved "
                                         f"without train.state_passing, resume with state_passing off or start anew")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("mode") != self.mode or int(meta.get("lag", -1)) != self.lag:
            raise layout.CheckpointError(
                f"{path}: saved with state_passing={meta.get('mode')} lag={meta.get('lag')}, now {self.mode} lag={self.lag} "
                "(lag = max(1, data.num_workers)); resume with the same settings")
        tensors = load_file(str(path))
        self.generator.set_state(tensors.pop("noise_generator"))
        slots: list[list[Optional[State]]] = [[None] * self.n_blocks for _ in range(int(meta["slots"]))]
        for name, value in tensors.items():
            slot, block, key = name.split(".", 2)
            entry = slots[int(slot)][int(block)]
            if entry is None:
                entry = slots[int(slot)][int(block)] = {}
            entry[key] = value.to(device)
        self.queue = deque(slots)


def attach_state_passing(engine: Any, cfg: Any, rank: int) -> None:
    """Give ``engine`` (a ZeroEngine) the carrier ``cfg.train.state_passing`` asks for; nothing when off."""
    mode = cfg.train.state_passing
    if mode == "off":
        return
    engine.state_passing = StatePassing(engine.module, mode, lag=max(1, cfg.data.num_workers),
                                        noise_std=cfg.train.state_noise_std, seed=cfg.train.seed, rank=rank)
