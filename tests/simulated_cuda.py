"""A CUDA device simulated on the CPU, so that device discipline is tested where there is no GPU.

Inside `SimulatedCuda()`, a tensor made on "cuda" (a factory's `device=`, `.to("cuda")`, `.cuda()`, or any
operation on such tensors) keeps its data in CPU memory but reports `cuda:0`, and every operation that
mixes it with a CPU tensor fails as it would on a GPU: "Expected all tensors to be on the same device".
What CUDA allows is allowed: CPU 0-dim tensors beside CUDA ones, CPU index tensors into a CUDA tensor.
Reads that make the host wait for the device (`.item()`, `bool()`, `.tolist()`, `.nonzero()`, boolean-mask
indexing, copies to the CPU) are counted in `syncs`, and `.numpy()` of a CUDA tensor fails as it does there.

Why not the `meta` device or FakeTensor: both drop the data, so code that reads a value (a Cholesky's
status, a count of non-zeros) cannot run on them; this keeps the data and fakes only the device.
torch.cuda's own functions (streams, memory figures) are not simulated.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

CUDA = torch.device("cuda", 0)
_T = torch.Tensor
_MOVES = {_T.to, _T.cuda, _T.cpu}
_SYNCS = {_T.item, _T.__bool__, _T.__int__, _T.__float__, _T.__index__, _T.tolist, _T.nonzero, torch.nonzero,
          _T.masked_select, torch.masked_select, torch.unique, _T.unique, torch.repeat_interleave}
_INDEXING = {_T.__getitem__, _T.__setitem__}
_UNCHECKED = {torch._has_compatible_shallow_copy_type}  # nn.Module.to asks it of a tensor and its moved copy


def _device_of(value: Any) -> bool | None:
    """True for a CUDA device spec, False for a CPU one, None when `value` names no device."""
    if isinstance(value, (str, torch.device)):
        return torch.device(value).type == "cuda"
    if isinstance(value, int) and not isinstance(value, bool):
        return True  # .to(0), .cuda(0)
    return None


class SimulatedCuda(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self._on: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.syncs = 0
        self._made: Made | None = None

    def count_made(self) -> "Made":
        """From now on, record the tensors operations on the device make (see Made)."""
        self._made = Made()
        return self._made

    def is_cuda(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t in self._on

    def _tag(self, out: Any) -> Any:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._on[t] = True
        return out

    def _check_mixed(self, name: str, tensors: list[torch.Tensor]) -> None:
        on_gpu = [t for t in tensors if self.is_cuda(t)]
        on_cpu = [t for t in tensors if not self.is_cuda(t) and t.dim() > 0]
        if on_gpu and on_cpu:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:0 and cpu! (simulated, in {name})")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
        getter = getattr(func, "__self__", None)  # a property's __get__ is bound to its descriptor
        if getter is _T.device:
            return CUDA if self.is_cuda(args[0]) else func(*args)
        if getter is _T.is_cuda:
            return self.is_cuda(args[0])
        if getter is _T.data and getattr(func, "__name__", "") == "__set__":  # param.data = moved (nn.Module.to)
            func(*args)
            if self.is_cuda(args[1]):
                self._tag(args[0])
            else:
                self._on.pop(args[0], None)
            return None
        if func in _UNCHECKED:
            return func(*args, **kwargs)
        if func is _T.get_device:
            return 0 if self.is_cuda(args[0]) else func(*args)
        if func is _T.numpy and self.is_cuda(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy (simulated)")
        if func in _MOVES:
            return self._move(func, args, kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in _SYNCS and any(self.is_cuda(t) for t in tensors):
            self.syncs += 1
        if func in _INDEXING:
            self._check_indexing(name, args)
        else:
            self._check_mixed(name, tensors)
        factory_on_cuda = _device_of(kwargs.get("device")) is True
        if factory_on_cuda:
            kwargs = {**kwargs, "device": "cpu"}
        out = func(*args, **kwargs)
        if factory_on_cuda or any(self.is_cuda(t) for t in tensors):
            self._tag(out)
            if self._made is not None:
                self._made.record(name, out, tensors)
        return out

    def _check_indexing(self, name: str, args: tuple) -> None:
        target, index = args[0], args[1]
        indices = [t for t in tree_flatten(index)[0] if isinstance(t, torch.Tensor)]
        if self.is_cuda(target):
            if any(t.dtype == torch.bool for t in indices):
                self.syncs += 1  # a boolean mask: the result's size is read on the host
            if len(args) > 2 and isinstance(args[2], torch.Tensor) and not self.is_cuda(args[2]) and args[2].dim() > 0:
                self._check_mixed(name, [target, args[2]])
        else:
            self._check_mixed(name, [target] + indices + [a for a in args[2:] if isinstance(a, torch.Tensor)])

    def _move(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        """`.to` / `.cuda` / `.cpu`: the real call with the device replaced by the CPU, then tagged."""
        source, rest = args[0], list(args[1:])
        target = {_T.cuda: True, _T.cpu: False}.get(func)
        if func is _T.to:
            for i, a in enumerate(rest):
                if isinstance(a, torch.Tensor):  # .to(other): other's dtype and device
                    target, rest[i] = self.is_cuda(a), a.dtype
                elif _device_of(a) is not None:
                    target, rest[i] = _device_of(a), "cpu"
            if _device_of(kwargs.get("device")) is not None:
                target, kwargs = _device_of(kwargs["device"]), {**kwargs, "device": "cpu"}
            out = func(source, *rest, **kwargs)
        else:
            out = source.to(**{k: v for k, v in kwargs.items() if k in ("non_blocking", "memory_format")})
        was = self.is_cuda(source)
        if target is None or target == was:
            return self._tag(out) if was else out
        if out is source:
            out = source.clone()
        if target:
            return self._tag(out)
        self.syncs += 1  # device to host
        self._on.pop(out, None)
        return out


class Made:
    """Tensors made on the device by operations (views and an operation's own inputs handed back excluded)."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, torch.dtype, int]] = []

    def record(self, name: str, out: Any, inputs: list[torch.Tensor]) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t._base is None and not any(t is i for i in inputs):
                self.tensors.append((name, t.dtype, t.numel()))

    def integer_tensors(self, larger_than: int = 0) -> list[tuple[str, torch.dtype, int]]:
        """Made tensors of integers or booleans (indices, masks) of more than `larger_than` elements."""
        return [m for m in self.tensors if not m[1].is_floating_point and m[2] > larger_than]


def on_cuda(tree: Any) -> Any:
    """Every tensor in `tree` moved to the (simulated, inside SimulatedCuda) CUDA device."""
    return tree_map(lambda t: t.to("cuda") if isinstance(t, torch.Tensor) else t, tree)
