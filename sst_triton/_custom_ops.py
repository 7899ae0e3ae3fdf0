"""The attention as ``torch.library`` custom operators: what ``torch.compile`` sees.

Two forward operators, one per backend, each with a fake (meta) implementation, an
autograd rule whose backward is a second custom operator, and an autocast rule:

- ``sst_triton::attention_torch``: the sparse PyTorch path (any device). Its backward,
  ``sst_triton::attention_torch_bwd``, recomputes the forward under ``enable_grad`` and
  takes ``torch.autograd.grad``: the forward keeps nothing but its inputs.
- ``sst_triton::attention_triton``: the fused Triton kernels (compiled on CUDA, Triton's
  interpreter on CPU tensors). It also returns the log-sum-exp per query and the key that
  attained each affinity, which its backward ``sst_triton::attention_triton_bwd`` (the
  fused backward kernels) needs.

Because every call is one opaque operator, Dynamo traces a model that uses the attention
with no graph break, and Inductor keeps the kernels as they are. A pattern travels as plain
arguments (``kind``, ``kernel_size``, ``stride``, ``boundary``, ``causal``), since custom
operators only take tensors and scalars. Without labels the affinity (and the argmax) are
empty tensors: an operator's outputs are fixed by its schema.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from .patterns import Pattern

_LIB = torch.library.Library("sst_triton", "FRAGMENT")


def pattern_args(pattern: Pattern) -> tuple[str, list[int], list[int], str, bool]:
    """A :class:`Pattern` as the scalar arguments of the operators."""
    return pattern.kind, list(pattern.kernel_size), list(pattern.stride), pattern.boundary, pattern.causal


def _pattern(kind: str, kernel_size: Sequence[int], stride: Sequence[int], boundary: str, causal: bool) -> Pattern:
    return Pattern(kind, tuple(kernel_size), tuple(stride), boundary, causal)  # type: ignore[arg-type]


def _affinity_shape(q: Tensor, num_objects: int) -> tuple[int, ...]:
    B, N, T, H, W, _ = q.shape
    return (B, N, num_objects, T, H, W)


# --------------------------------------------------------------------------------------
# PyTorch path
# --------------------------------------------------------------------------------------


@torch.library.custom_op("sst_triton::attention_torch", mutates_args=())
def attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kind: str,
    kernel_size: list[int],
    stride: list[int],
    boundary: str,
    causal: bool,
    scale: float,
    labels: Optional[Tensor],
    num_objects: int,
    causal_affinity: bool,
) -> tuple[Tensor, Tensor]:
    """Sparse attention on the PyTorch path.

    Args:
        q, k, v: ``(B, N, T, H, W, D)``.
        labels: ``(B, T, H, W)`` or ``None`` (then ``num_objects`` is ignored).

    Returns:
        ``out`` ``(B, N, T, H, W, D)`` contiguous in the dtype of ``q``, and the affinity
        ``(B, N, O, T, H, W)`` float32, or an empty float32 tensor without labels.
    """
    from . import torch_path

    pattern = _pattern(kind, kernel_size, stride, boundary, causal)
    if labels is None:
        out = torch_path.sparse_attention(q, k, v, pattern, scale)
        return out.contiguous(), q.new_empty((0,), dtype=torch.float32)
    out, aff = torch_path.sparse_attention(q, k, v, pattern, scale, labels, num_objects, causal_affinity)
    return out.contiguous(), aff.to(torch.float32).contiguous()


@attention_torch.register_fake
def _(q, k, v, kind, kernel_size, stride, boundary, causal, scale, labels, num_objects, causal_affinity):
    aff_shape = (0,) if labels is None else _affinity_shape(q, num_objects)
    return q.new_empty(q.shape), q.new_empty(aff_shape, dtype=torch.float32)


@contextlib.contextmanager
def _autograd_enabled():
    """Record an autograd graph inside an operator's implementation.

    A custom operator runs below the autograd dispatch key (excluded from the thread-local
    dispatch set) with grad mode off; the recompute-and-differentiate backward needs both back.
    """
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@torch.library.custom_op("sst_triton::attention_torch_bwd", mutates_args=())
def attention_torch_bwd(
    grad_out: Tensor,
    grad_affinity: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kind: str,
    kernel_size: list[int],
    stride: list[int],
    boundary: str,
    causal: bool,
    scale: float,
    labels: Optional[Tensor],
    num_objects: int,
    causal_affinity: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`attention_torch` in ``q``, ``k``, ``v`` by recomputing its graph.

    Args:
        grad_out: ``(B, N, T, H, W, D)``.
        grad_affinity: ``(B, N, O, T, H, W)``; ignored without labels.

    Returns:
        ``dq``, ``dk``, ``dv``, contiguous, each ``(B, N, T, H, W, D)`` in the dtype of ``q``.
    """
    from . import torch_path

    pattern = _pattern(kind, kernel_size, stride, boundary, causal)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with _autograd_enabled():
        if labels is None:
            outputs, grads = [torch_path.sparse_attention(*leaves, pattern, scale)], [grad_out]
        else:
            out, aff = torch_path.sparse_attention(*leaves, pattern, scale, labels, num_objects, causal_affinity)
            outputs, grads = [out, aff], [grad_out, grad_affinity.to(aff.dtype)]
        dq, dk, dv = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
    return tuple(
        (torch.zeros_like(x) if g is None else g.to(x.dtype)).contiguous() for g, x in zip((dq, dk, dv), (q, k, v))
    )


@attention_torch_bwd.register_fake
def _(grad_out, grad_affinity, q, k, v, *args):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_torch(ctx, inputs, output):
    q, k, v, *params = inputs
    ctx.params = params[:-3] + [params[-2], params[-1]]  # everything but labels
    ctx.save_for_backward(q, k, v, params[-3])


def _backward_torch(ctx, grad_out, grad_affinity):
    q, k, v, labels = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    if grad_affinity is None:
        grad_affinity = q.new_zeros((0,) if labels is None else _affinity_shape(q, ctx.params[6]), dtype=torch.float32)
    kind, kernel_size, stride, boundary, causal, scale, num_objects, causal_affinity = ctx.params
    dq, dk, dv = attention_torch_bwd(
        grad_out, grad_affinity, q, k, v, kind, kernel_size, stride, boundary, causal, scale,
        labels, num_objects, causal_affinity,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


attention_torch.register_autograd(_backward_torch, setup_context=_setup_torch)


# --------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------


@torch.library.custom_op("sst_triton::attention_triton", mutates_args=())
def attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kind: str,
    kernel_size: list[int],
    stride: list[int],
    boundary: str,
    causal: bool,
    scale: float,
    labels: Optional[Tensor],
    num_objects: int,
    causal_affinity: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sparse attention by the fused Triton forward kernels.

    Returns:
        ``out`` ``(B, N, T, H, W, D)`` in the dtype of ``q``; the affinity
        ``(B, N, O, T, H, W)`` float32; ``lse`` ``(B, N, T, H, W)`` float32, the natural
        log-sum-exp of each query's scaled logits; ``argmax`` ``(B, N, O, T, H, W)`` int32,
        the flat key index that attained each affinity (``-1`` if none). Without labels the
        affinity and the argmax are empty.
    """
    from . import triton_path

    pattern = _pattern(kind, kernel_size, stride, boundary, causal)
    out, aff, lse, argmax = triton_path.forward(
        q, k, v, pattern, scale, labels, num_objects if labels is not None else None, causal_affinity
    )
    if aff is None:
        aff = q.new_empty((0,), dtype=torch.float32)
        argmax = q.new_empty((0,), dtype=torch.int32)
    return out.contiguous(), aff.contiguous(), lse.contiguous(), argmax.contiguous()


@attention_triton.register_fake
def _(q, k, v, kind, kernel_size, stride, boundary, causal, scale, labels, num_objects, causal_affinity):
    B, N, T, H, W, _ = q.shape
    aff_shape = (0,) if labels is None else _affinity_shape(q, num_objects)
    return (
        q.new_empty(q.shape),
        q.new_empty(aff_shape, dtype=torch.float32),
        q.new_empty((B, N, T, H, W), dtype=torch.float32),
        q.new_empty(aff_shape, dtype=torch.int32),
    )


@torch.library.custom_op("sst_triton::attention_triton_bwd", mutates_args=())
def attention_triton_bwd(
    grad_out: Tensor,
    grad_affinity: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    affinity: Tensor,
    lse: Tensor,
    argmax: Tensor,
    kind: str,
    kernel_size: list[int],
    stride: list[int],
    boundary: str,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`attention_triton` by the fused backward kernels.

    Args:
        grad_out: ``(B, N, T, H, W, D)``.
        grad_affinity, affinity, argmax: ``(B, N, O, T, H, W)``, or empty without labels.
        lse: ``(B, N, T, H, W)``.

    Returns:
        ``dq``, ``dk``, ``dv``, contiguous, each ``(B, N, T, H, W, D)`` in the dtype of ``q``.
    """
    from .kernels import backward

    pattern = _pattern(kind, kernel_size, stride, boundary, causal)
    with_aff = argmax.numel() > 0
    return backward.attention_backward(
        grad_out, q, k, v, out, lse, pattern, scale,
        grad_affinity if with_aff else None, affinity if with_aff else None, argmax if with_aff else None,
    )


@attention_triton_bwd.register_fake
def _(grad_out, grad_affinity, q, k, v, *args):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_triton(ctx, inputs, output):
    q, k, v, kind, kernel_size, stride, boundary, causal, scale, _labels, _num_objects, _causal_aff = inputs
    out, aff, lse, argmax = output
    ctx.params = (kind, kernel_size, stride, boundary, causal, scale)
    ctx.mark_non_differentiable(lse, argmax)
    ctx.save_for_backward(q, k, v, out, aff, lse, argmax)


def _backward_triton(ctx, grad_out, grad_affinity, _grad_lse, _grad_argmax):
    q, k, v, out, aff, lse, argmax = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_affinity is None:
        grad_affinity = torch.zeros_like(aff)
    dq, dk, dv = attention_triton_bwd(grad_out, grad_affinity, q, k, v, out, aff, lse, argmax, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


attention_triton.register_autograd(_backward_triton, setup_context=_setup_triton)


# --------------------------------------------------------------------------------------
# Autocast: q, k, v take the autocast dtype of their device, as SDPA's do
# --------------------------------------------------------------------------------------


def _register_autocast(op_name: str, device_type: str) -> None:
    """Cast the first three (floating) arguments to ``torch.get_autocast_dtype(device_type)``.

    ``torch.library.register_autocast`` casts to one dtype fixed at registration; SDPA
    follows the dtype of the enclosing ``torch.autocast`` instead, so the rule is written out.
    """
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))
    op = getattr(torch.ops.sst_triton, op_name).default

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        qkv = tuple(
            x.to(dtype) if x.is_floating_point() and x.device.type == device_type else x for x in args[:3]
        )
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op(*qkv, *args[3:])

    _LIB.impl(op_name, kernel, key_name, with_keyset=True)


for _name in ("attention_torch", "attention_triton"):
    for _device in ("cpu", "cuda"):
        _register_autocast(_name, _device)


# --------------------------------------------------------------------------------------
# What ops.py calls
# --------------------------------------------------------------------------------------


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    scale: float,
    labels: Optional[Tensor],
    num_objects: Optional[int],
    causal_affinity: bool,
    backend: str,
):
    """Run the operator of ``backend`` (``"torch"`` or ``"triton"``); arguments already checked.

    Returns:
        ``out``, or ``(out, affinity)`` with labels.
    """
    args = (*pattern_args(pattern), float(scale), labels, int(num_objects or 0), bool(causal_affinity))
    if backend == "triton":
        out, aff, _lse, _argmax = attention_triton(q, k, v, *args)
    else:
        out, aff = attention_torch(q, k, v, *args)
    return out if labels is None else (out, aff)
