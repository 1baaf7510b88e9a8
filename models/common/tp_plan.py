"""Tensor-parallel plans: how each module of a family is split over the tensor-parallel ranks.

A plan is data, not code that communicates. Each family describes its own modules next to its
code (``models/<family>/tp_plan.py``, registered with ``@register_tp_plan(ModuleClass)``) and the
config shapes that must divide by the tensor-parallel degree (``@register_tp_requirements``).
``hybrid_lm.train.tensor_parallel`` reads the plans and does the splitting and the collectives,
so nothing in ``models/`` imports torch.distributed or megatron-core.

What a plan says, for one module and a degree ``tp`` (see ``TPPlan``):

* ``column``: linear layers whose *output* features are split (Megatron's ColumnParallelLinear:
  the input is replicated, each rank computes its own output slice). A fused projection lists the
  global widths of its components, e.g. Mamba-2's ``in_proj`` = ``[z, x, B, C, dt]``: every
  component is cut into ``tp`` contiguous pieces and rank r keeps piece r of *each*, so a rank
  holds all the rows of its own heads (not a contiguous slice of the fused matrix).
* ``row``: linear layers whose *input* features are split (RowParallelLinear): each rank
  multiplies its slice and the outputs are summed over the ranks; the bias is added once after.
* ``vocab``: the embedding and LM head, split by vocabulary rows (tied weights stay one tensor).
* ``split``: any other parameter cut the same way along ``dim`` (conv taps, per-head scalars,
  per-head memory weights).
* ``partial_grad``: replicated parameters that only the local heads use (a norm shared by all
  heads): each rank's gradient is a partial sum, so the gradients are summed over the ranks.
* ``local``: attribute values of the module that become local (head counts): the layer code
  reads them in ``forward`` and so runs unchanged on its share of the heads.

Every other parameter is replicated and must receive the same gradient on every rank (true when
its inputs are replicated, as for the block norms). A model holding a ``Layer`` without a plan
is refused, so a new family cannot be silently half-split.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, TypeVar

from torch import nn

from hybrid_lm.models.common.mlp import SwiGLU
from hybrid_lm.models.hybrid import HybridLM

if TYPE_CHECKING:
    from hybrid_lm.models.config import ModelConfig

#: modules whose import registers the built-in plans (as ``registry.BUILTIN_FAMILIES`` for layers)
BUILTIN_PLANS: tuple[str, ...] = (
    "hybrid_lm.models.common.tp_plan",
    "hybrid_lm.models.attention.tp_plan",
    "hybrid_lm.models.mamba2.tp_plan",
    "hybrid_lm.models.titans.tp_plan",
)


@dataclass(frozen=True)
class Split:
    """A parameter cut along ``dim``. ``sizes`` are the global widths of the components packed
    along that dim (one entry for an unfused parameter); each is cut into ``tp`` equal contiguous
    pieces and rank r keeps piece r of every component, in order."""

    dim: int
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TPPlan:
    """The split of one module at one degree; paths are relative to the module ("" = itself)."""

    column: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """linear path -> global widths of its output components (a fused projection lists several)"""
    row: tuple[str, ...] = ()
    """linear paths split by input features; outputs summed over the ranks"""
    vocab: Mapping[str, Literal["embedding", "head"]] = field(default_factory=dict)
    """embedding / LM-head paths split by vocabulary rows"""
    split: Mapping[str, Split] = field(default_factory=dict)
    """parameter path -> how it is cut"""
    partial_grad: tuple[str, ...] = ()
    """replicated parameter paths whose gradient each rank sees only in part (summed over ranks)"""
    local: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """submodule path -> {attribute: value on each rank}"""


@dataclass(frozen=True)
class Requirement:
    """A config value that must be a multiple of the tensor-parallel degree."""

    key: str
    """dotted key under ``model.`` that the user changes to fix it"""
    value: int
    what: str = ""
    """what the value counts, when it is not the key's own value (``SSM heads = expand*d_model/headdim``)"""

    def problem(self, tp: int) -> str:
        counted = f" ({self.what})" if self.what else ""
        return f"model.{self.key}: {self.value}{counted} is not divisible by parallel.tensor_parallel={tp}"


PlanFn = Callable[[Any, int], TPPlan]
RequirementsFn = Callable[["ModelConfig"], list[Requirement]]
_PLANS: dict[type, PlanFn] = {}
_REQUIREMENTS: dict[str, RequirementsFn] = {}
M = TypeVar("M", bound=Callable[..., Any])


def register_tp_plan(*classes: type) -> Callable[[M], M]:
    """Decorator: ``@register_tp_plan(Attention)`` on a ``(module, tp) -> TPPlan`` function."""

    def wrap(fn: M) -> M:
        for cls in classes:
            _PLANS[cls] = fn
        return fn

    return wrap


def register_tp_requirements(letters: str) -> Callable[[M], M]:
    """Decorator: the ``(ModelConfig) -> [Requirement]`` function of the layer letters ``letters``
    ("" = every model, e.g. the vocabulary)."""

    def wrap(fn: M) -> M:
        for letter in letters or [""]:
            _REQUIREMENTS[letter] = fn
        return fn

    return wrap


def _load_builtin() -> None:
    for module in BUILTIN_PLANS:
        importlib.import_module(module)


def plan_for(module: nn.Module, tp: int) -> TPPlan | None:
    """The plan of ``module``'s exact class at degree ``tp``, or None when it has none."""
    _load_builtin()
    fn = _PLANS.get(type(module))
    return None if fn is None else fn(module, tp)


def has_plan(module: nn.Module) -> bool:
    _load_builtin()
    return type(module) in _PLANS


def tp_requirements(config: "ModelConfig") -> list[Requirement]:
    """What must divide by the degree for ``config``: the model-wide entries, then those of each
    letter of the pattern (each letter once)."""
    _load_builtin()
    out: list[Requirement] = []
    for letter in ["", *dict.fromkeys(config.layer_pattern)]:
        fn = _REQUIREMENTS.get(letter)
        if fn is not None:
            out.extend(r for r in fn(config) if r not in out)
    return out


def local_count(value: int, tp: int) -> int:
    """``value / tp`` for a count the config checks guarantee divisible (a plan's local attribute)."""
    if value % tp:
        raise ValueError(f"{value} is not divisible by the tensor-parallel degree {tp}")
    return value // tp


@register_tp_plan(SwiGLU)
def swiglu_plan(mlp: SwiGLU, tp: int) -> TPPlan:
    """gate/up split by hidden units (each rank a slice of the hidden layer), down sums them."""
    hidden = mlp.gate_proj.out_features
    return TPPlan(column={"gate_proj": (hidden,), "up_proj": (hidden,)}, row=("down_proj",))


@register_tp_plan(HybridLM)
def stack_plan(model: HybridLM, tp: int) -> TPPlan:
    """Embedding and LM head by vocabulary rows (tied: one tensor, split once); the block and
    final norms stay replicated (their inputs are)."""
    return TPPlan(vocab={"embed": "embedding", "lm_head": "head"})


@register_tp_requirements("")
def stack_requirements(config: "ModelConfig") -> list[Requirement]:
    return [Requirement("vocab_size", config.vocab_size)]


@register_tp_requirements("-")
def mlp_requirements(config: "ModelConfig") -> list[Requirement]:
    what = "" if config.mlp.hidden_size is not None else "the SwiGLU width from d_model and multiple_of"
    return [Requirement("mlp.hidden_size", config.mlp_hidden_size, what)]
