"""nn.Sequential that runs its native int8 children without nn.Module.__call__ per child.

At batch 1 the work of a small int8 CNN is a few microseconds a layer, and calling each child
module costs about as much: measured on LeNet-5's native int8 variant (1 thread), the model
took 104 us through its two nn.Sequential and 74 us as the same operators called in a row.
The gap is nn.Module.__call__ per child (12 of them), the identity modules left where a ReLU
was fused (FusedAway), and the Python wrappers of max pooling and flatten.

So a Sequential holding native int8 layers becomes a NativeSequential (its class is swapped in
place, like torch.nn.utils.parametrize does: same object, children, names and state dict),
whose forward runs a plan built from its children: FusedAway dropped, native layers' forward
called directly, nn.MaxPool2d and nn.Flatten as their torch functions, any other child called
as a module. The plan is only a faster route to the same result: the forward falls back to
nn.Sequential's when the module is in training mode, when a child was replaced since the plan
was built, or when a hook is registered on a child the plan calls directly (or a global one),
so hooks still run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

from slimserve.runtimes.quantized import native as qnative

Step = Callable[[torch.Tensor], torch.Tensor]
# Registered with torch.nn.modules.module.register_module_forward_hook and friends; mutated in
# place, so holding them is enough to see a hook added later.
_GLOBAL_HOOKS = (
    _module._global_forward_hooks,
    _module._global_forward_pre_hooks,
    _module._global_backward_hooks,
    _module._global_backward_pre_hooks,
)


@dataclass(frozen=True)
class _Plan:
    children: tuple[nn.Module, ...]  # the children it was built from, in order
    steps: tuple[Step, ...]
    hook_dicts: tuple[dict[Any, Any], ...]  # hooks of the children called directly, and globals


def _step(child: nn.Module) -> Step | None:
    """A direct call doing what child(x) does (None: skip it), or child itself."""
    if isinstance(child, qnative.FusedAway):
        return None
    if isinstance(child, qnative._NativeInt8):
        return child.forward
    if type(child) is nn.MaxPool2d and not child.return_indices:
        args = (child.kernel_size, child.stride, child.padding, child.dilation, child.ceil_mode)
        return lambda x: torch.max_pool2d(x, *args)
    if type(child) is nn.Flatten:
        start, end = child.start_dim, child.end_dim
        return lambda x: x.flatten(start, end)
    return child  # called as a module: its own hooks run as usual


def _build_plan(seq: nn.Sequential) -> _Plan:
    children = tuple(seq._modules.values())
    steps, hooks = [], list(_GLOBAL_HOOKS)
    for child in children:
        assert child is not None  # nn.Sequential children are modules
        step = _step(child)
        if step is not child:  # called around nn.Module.__call__: watch its hooks
            hooks += [child._forward_hooks, child._forward_pre_hooks]
            hooks += [child._backward_hooks, child._backward_pre_hooks]
        if step is not None:
            steps.append(step)
    return _Plan(children, tuple(steps), tuple(hooks))


class NativeSequential(nn.Sequential):
    """nn.Sequential whose forward runs a plan of direct calls (module docstring).

    The plan is rebuilt when a child is set (setattr, seq[i] = m, add_module) or the number
    of children changes (append, insert, del); comparing every child at each call would
    cost a microsecond.
    """

    _plan: _Plan | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        if plan is None or len(plan.children) != len(self._modules):
            plan = self._plan = _build_plan(self)
        if self.training or any(plan.hook_dicts):
            out: torch.Tensor = super().forward(x)  # type: ignore[no-untyped-call]
            return out
        for step in plan.steps:
            x = step(x)
        return x

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, nn.Module) or name in self.__dict__.get("_modules", ()):
            self.__dict__.pop("_plan", None)
        super().__setattr__(name, value)

    def add_module(self, name: str, module: nn.Module | None) -> None:
        self.__dict__.pop("_plan", None)
        super().add_module(name, module)

    def __getstate__(self) -> dict[str, Any]:  # deepcopy/pickle: the plan holds bound methods
        state = dict(self.__dict__)
        state.pop("_plan", None)
        return state


def use_native_sequentials(model: nn.Module) -> int:
    """Make each plain nn.Sequential in `model` (itself included) with a native int8 child a
    NativeSequential, in place; the number changed."""
    changed = 0
    for m in model.modules():
        if type(m) is nn.Sequential and any(
            isinstance(c, qnative._NativeInt8) for c in m.children()
        ):
            m.__class__ = NativeSequential
            changed += 1
    return changed
