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
arguments (``kind``, ``kernel_size``, ``stride``, ``boundary``, ``causal``, ``dilation``),
since custom operators only take tensors and scalars. Without labels the affinity (and the
argmax) are empty tensors, and so is the torch operator's lse when it was not asked for: an
operator's outputs are fixed by its schema. Grouped heads and fewer query frames need no
argument: they are the shapes of ``q`` against ``k``, ``v``.

Extra keys ``(k_x, v_x)`` on the Triton path are joined at this level: the fused sparse
kernel gives ``(out_s, aff_s, lse_s)``, a dense attention over the ``L`` extra keys gives
``(out_x, lse_x)``, and the log-sum-exp merge is exact (``aff = aff_s * exp(lse_s - lse)``).
Its backward is written out: the sparse kernels' backward recomputes ``P`` from the *joint*
lse and is fed the joint ``out``, ``affinity`` and the gradients of the joint outputs, which
makes it the sparse keys' share of the joint softmax's backward exactly; the extra keys'
share is :func:`sst_triton.torch_path.extra_attention_backward`.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from .patterns import Pattern

_LIB = torch.library.Library("sst_triton", "FRAGMENT")


def pattern_args(pattern: Pattern) -> tuple[str, list[int], list[int], str, bool, list[int]]:
    """A :class:`Pattern` as the scalar arguments of the operators."""
    return (
        pattern.kind, list(pattern.kernel_size), list(pattern.stride), pattern.boundary, pattern.causal,
        list(pattern.dilation),
    )


def _pattern(
    kind: str, kernel_size: Sequence[int], stride: Sequence[int], boundary: str, causal: bool, dilation: Sequence[int]
) -> Pattern:
    return Pattern(kind, tuple(kernel_size), tuple(stride), boundary, causal, tuple(dilation))  # type: ignore[arg-type]


def _affinity_shape(q: Tensor, num_objects: int) -> tuple[int, ...]:
    B, N, T_q, H, W, _ = q.shape
    return (B, N, num_objects, T_q, H, W)


def _has_extra(k_x: Optional[Tensor]) -> bool:
    # L = 0 is legal and means no extra keys: skipping it keeps the result bit-identical
    return k_x is not None and k_x.shape[2] > 0


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,), dtype=torch.float32)


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
    dilation: list[int],
    scale: float,
    labels: Optional[Tensor],
    num_objects: int,
    causal_affinity: bool,
    k_x: Optional[Tensor],
    v_x: Optional[Tensor],
    return_lse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse attention on the PyTorch path.

    Args:
        q: ``(B, N, T_q, H, W, D)``; k, v: ``(B, N_kv, T, H, W, D)``.
        labels: ``(B, T, H, W)`` or ``None`` (then ``num_objects`` is ignored).
        k_x, v_x: ``(B, N_kv, L, D)`` extra keys/values, or ``None``.
        return_lse: compute the log-sum-exp output.

    Returns:
        ``out`` ``(B, N, T_q, H, W, D)`` contiguous in the dtype of ``q``; the affinity
        ``(B, N, O, T_q, H, W)`` float32, or an empty float32 tensor without labels;
        ``lse`` ``(B, N, T_q, H, W)`` float32, or empty without ``return_lse``.
    """
    from . import torch_path

    pattern = _pattern(kind, kernel_size, stride, boundary, causal, dilation)
    res = torch_path.sparse_attention(
        q, k, v, pattern, scale, labels, num_objects if labels is not None else None, causal_affinity,
        extra_kv=(k_x, v_x) if k_x is not None else None, return_lse=return_lse,
    )
    res = list(res) if isinstance(res, tuple) else [res]
    out = res.pop(0).contiguous()
    aff = res.pop(0).to(torch.float32).contiguous() if labels is not None else _empty(q)
    lse = res.pop(0).to(torch.float32).contiguous() if return_lse else _empty(q)
    return out, aff, lse


@attention_torch.register_fake
def _(q, k, v, kind, kernel_size, stride, boundary, causal, dilation, scale, labels, num_objects, causal_affinity,
      k_x, v_x, return_lse):
    aff_shape = (0,) if labels is None else _affinity_shape(q, num_objects)
    lse_shape = q.shape[:-1] if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(aff_shape, dtype=torch.float32), q.new_empty(lse_shape, dtype=torch.float32)


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
    grad_lse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kind: str,
    kernel_size: list[int],
    stride: list[int],
    boundary: str,
    causal: bool,
    dilation: list[int],
    scale: float,
    labels: Optional[Tensor],
    num_objects: int,
    causal_affinity: bool,
    k_x: Optional[Tensor],
    v_x: Optional[Tensor],
    return_lse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`attention_torch` in ``q``, ``k``, ``v``, ``k_x``, ``v_x`` by recomputing its graph.

    Args:
        grad_out: ``(B, N, T_q, H, W, D)``.
        grad_affinity: ``(B, N, O, T_q, H, W)``; ignored without labels.
        grad_lse: ``(B, N, T_q, H, W)``; ignored without ``return_lse``.

    Returns:
        ``dq`` like ``q``, ``dk``, ``dv`` like ``k``, ``dk_x``, ``dv_x`` like ``k_x`` (empty
        without extra keys), contiguous, in the dtype of ``q``.
    """
    from . import torch_path

    pattern = _pattern(kind, kernel_size, stride, boundary, causal, dilation)
    with_extra = k_x is not None
    inputs = [q, k, v] + ([k_x, v_x] if with_extra else [])
    leaves = [x.detach().requires_grad_() for x in inputs]
    with _autograd_enabled():
        res = torch_path.sparse_attention(
            *leaves[:3], pattern, scale, labels, num_objects if labels is not None else None, causal_affinity,
            extra_kv=(leaves[3], leaves[4]) if with_extra else None, return_lse=return_lse,
        )
        outputs = list(res) if isinstance(res, tuple) else [res]
        grads = [grad_out]
        if labels is not None:
            grads.append(grad_affinity.to(outputs[1].dtype))
        if return_lse:
            grads.append(grad_lse.to(outputs[-1].dtype))
        found = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
    result = [
        (torch.zeros_like(x) if g is None else g.to(x.dtype)).contiguous() for g, x in zip(found, inputs)
    ]
    if not with_extra:
        result += [_empty(q).to(q.dtype), _empty(q).to(q.dtype)]
    return tuple(result)


@attention_torch_bwd.register_fake
def _(grad_out, grad_affinity, grad_lse, q, k, v, *args):
    k_x, v_x = args[-3], args[-2]
    extra = (q.new_empty(k_x.shape), q.new_empty(v_x.shape)) if k_x is not None else (q.new_empty((0,)),) * 2
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape), *extra


def _setup_torch(ctx, inputs, output):
    (q, k, v, kind, kernel_size, stride, boundary, causal, dilation, scale, labels, num_objects, causal_affinity,
     k_x, v_x, return_lse) = inputs
    ctx.params = (kind, kernel_size, stride, boundary, causal, dilation, scale)
    ctx.flags = (num_objects, causal_affinity, return_lse)
    ctx.save_for_backward(q, k, v, labels, k_x, v_x)


def _backward_torch(ctx, grad_out, grad_affinity, grad_lse):
    q, k, v, labels, k_x, v_x = ctx.saved_tensors
    num_objects, causal_affinity, return_lse = ctx.flags
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    if grad_affinity is None:
        grad_affinity = q.new_zeros((0,) if labels is None else _affinity_shape(q, num_objects), dtype=torch.float32)
    if grad_lse is None:
        grad_lse = q.new_zeros(q.shape[:-1] if return_lse else (0,), dtype=torch.float32)
    dq, dk, dv, dk_x, dv_x = attention_torch_bwd(
        grad_out, grad_affinity, grad_lse, q, k, v, *ctx.params, labels, num_objects, causal_affinity,
        k_x, v_x, return_lse,
    )
    extra = (dk_x, dv_x) if k_x is not None else (None, None)
    return dq, dk, dv, *([None] * 10), *extra, None


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
    dilation: list[int],
    scale: float,
    labels: Optional[Tensor],
    num_objects: int,
    causal_affinity: bool,
    k_x: Optional[Tensor],
    v_x: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sparse attention by the fused Triton forward kernels (and the extra keys, merged).

    Args:
        q: ``(B, N, T_q, H, W, D)``; k, v: ``(B, N_kv, T, H, W, D)``.
        k_x, v_x: ``(B, N_kv, L, D)`` extra keys/values, or ``None``.

    Returns:
        ``out`` ``(B, N, T_q, H, W, D)`` in the dtype of ``q``; the affinity
        ``(B, N, O, T_q, H, W)`` float32; ``lse`` ``(B, N, T_q, H, W)`` float32, the natural
        log-sum-exp of each query's scaled logits over its pattern and the extra keys;
        ``argmax`` ``(B, N, O, T_q, H, W)`` int32, the flat key index that attained each
        affinity (``-1`` if none). Without labels the affinity and the argmax are empty.
    """
    from . import torch_path, triton_path

    pattern = _pattern(kind, kernel_size, stride, boundary, causal, dilation)
    out, aff, lse, argmax = triton_path.forward(
        q, k, v, pattern, scale, labels, num_objects if labels is not None else None, causal_affinity,
        dilation=tuple(dilation),
    )
    if _has_extra(k_x):
        out_x, lse_x = torch_path.extra_attention(q.float(), k_x.float(), v_x.float(), scale)
        out, aff, lse = torch_path.merge_extra(out.float(), aff, lse, out_x, lse_x)
        out = out.to(q.dtype)
    if aff is None:
        aff = _empty(q)
        argmax = q.new_empty((0,), dtype=torch.int32)
    return out.contiguous(), aff.contiguous(), lse.contiguous(), argmax.contiguous()


@attention_triton.register_fake
def _(q, k, v, kind, kernel_size, stride, boundary, causal, dilation, scale, labels, num_objects, causal_affinity,
      k_x, v_x):
    aff_shape = (0,) if labels is None else _affinity_shape(q, num_objects)
    return (
        q.new_empty(q.shape),
        q.new_empty(aff_shape, dtype=torch.float32),
        q.new_empty(q.shape[:-1], dtype=torch.float32),
        q.new_empty(aff_shape, dtype=torch.int32),
    )


@torch.library.custom_op("sst_triton::attention_triton_bwd", mutates_args=())
def attention_triton_bwd(
    grad_out: Tensor,
    grad_affinity: Tensor,
    grad_lse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    affinity: Tensor,
    lse: Tensor,
    argmax: Tensor,
    k_x: Optional[Tensor],
    v_x: Optional[Tensor],
    kind: str,
    kernel_size: list[int],
    stride: list[int],
    boundary: str,
    causal: bool,
    dilation: list[int],
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`attention_triton` by the fused backward kernels (and the extra keys' share).

    Args:
        grad_out, out: ``(B, N, T_q, H, W, D)`` (``out`` the joint output when there are extra keys).
        grad_affinity, affinity, argmax: ``(B, N, O, T_q, H, W)``, or empty without labels.
        grad_lse: ``(B, N, T_q, H, W)`` or ``None`` when the lse has no gradient.
        lse: ``(B, N, T_q, H, W)``, the joint log-sum-exp.

    Returns:
        ``dq`` like ``q``; ``dk``, ``dv`` like ``k``; ``dk_x``, ``dv_x`` like ``k_x`` (empty
        without extra keys); contiguous, in the dtype of ``q``.
    """
    from . import torch_path
    from .kernels import backward

    pattern = _pattern(kind, kernel_size, stride, boundary, causal, dilation)
    with_aff = argmax.numel() > 0
    dq, dk, dv = backward.attention_backward(
        grad_out, q, k, v, out, lse, pattern, scale,
        grad_affinity if with_aff else None, affinity if with_aff else None, argmax if with_aff else None,
        grad_lse=grad_lse, dilation=tuple(dilation),
    )
    if not _has_extra(k_x):
        if k_x is None:
            return dq, dk, dv, q.new_empty((0,)), q.new_empty((0,))
        return dq, dk, dv, torch.zeros_like(k_x), torch.zeros_like(v_x)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # the same Delta as the sparse kernels' (joint out and affinity, minus the lse gradient)
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
    if with_aff:
        delta = delta + (grad_affinity.to(acc) * affinity.to(acc)).sum(2)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc)
    dq_x, dk_x, dv_x = torch_path.extra_attention_backward(grad_out, q, k_x, v_x, lse, delta, scale)
    dq = (dq.to(acc) + dq_x).to(q.dtype)
    return dq, dk, dv, dk_x.to(q.dtype).contiguous(), dv_x.to(q.dtype).contiguous()


@attention_triton_bwd.register_fake
def _(grad_out, grad_affinity, grad_lse, q, k, v, out, affinity, lse, argmax, k_x, v_x, *args):
    extra = (q.new_empty(k_x.shape), q.new_empty(v_x.shape)) if k_x is not None else (q.new_empty((0,)),) * 2
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape), *extra


def _setup_triton(ctx, inputs, output):
    (q, k, v, kind, kernel_size, stride, boundary, causal, dilation, scale, _labels, _num_objects, _causal_aff,
     k_x, v_x) = inputs
    out, aff, lse, argmax = output
    ctx.params = (kind, kernel_size, stride, boundary, causal, dilation, scale)
    ctx.mark_non_differentiable(argmax)
    ctx.save_for_backward(q, k, v, out, aff, lse, argmax, k_x, v_x)


def _backward_triton(ctx, grad_out, grad_affinity, grad_lse, _grad_argmax):
    q, k, v, out, aff, lse, argmax, k_x, v_x = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_affinity is None:
        grad_affinity = torch.zeros_like(aff)
    dq, dk, dv, dk_x, dv_x = attention_triton_bwd(
        grad_out, grad_affinity, grad_lse, q, k, v, out, aff, lse, argmax, k_x, v_x, *ctx.params
    )
    extra = (dk_x, dv_x) if k_x is not None else (None, None)
    return dq, dk, dv, *([None] * 10), *extra


attention_triton.register_autograd(_backward_triton, setup_context=_setup_triton)


# --------------------------------------------------------------------------------------
# Autocast: q, k, v (and the extra keys) take the autocast dtype of their device, as SDPA's do
# --------------------------------------------------------------------------------------

# positions of q, k, v, k_x, v_x in both forward operators' schemas
_CAST_POSITIONS = (0, 1, 2, 13, 14)


def _register_autocast(op_name: str, device_type: str) -> None:
    """Cast the floating tensors among q, k, v, k_x, v_x to ``torch.get_autocast_dtype(device_type)``.

    ``torch.library.register_autocast`` casts to one dtype fixed at registration; SDPA
    follows the dtype of the enclosing ``torch.autocast`` instead, so the rule is written out.
    """
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))
    op = getattr(torch.ops.sst_triton, op_name).default

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        args = list(args)
        for i in _CAST_POSITIONS:
            x = args[i]
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.device.type == device_type:
                args[i] = x.to(dtype)
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op(*args)

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
    extra_kv: Optional[tuple[Tensor, Tensor]] = None,
    return_lse: bool = False,
):
    """Run the operator of ``backend`` (``"torch"`` or ``"triton"``); arguments already checked.

    Returns:
        ``out``, with labels ``(out, affinity)``, and ``lse`` appended with ``return_lse``.
    """
    args = (*pattern_args(pattern), float(scale), labels, int(num_objects or 0), bool(causal_affinity))
    k_x, v_x = extra_kv if extra_kv is not None else (None, None)
    if backend == "triton":
        out, aff, lse, _argmax = attention_triton(q, k, v, *args, k_x, v_x)
    else:
        out, aff, lse = attention_torch(q, k, v, *args, k_x, v_x, bool(return_lse))
    results = [out]
    if labels is not None:
        results.append(aff)
    if return_lse:
        results.append(lse)
    return results[0] if len(results) == 1 else tuple(results)
