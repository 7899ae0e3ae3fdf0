"""Pieces shared by every forward kernel: the online softmax, the running object maxima,
the epilogue, the interpreter twin of a kernel and the AOT description of a kernel.

Units: logits are kept in base 2 (``scale * log2(e) * q.k``) so the kernels use ``exp2``;
the epilogue turns the log-sum-exp back into natural log.

Dot precision: float16/bfloat16 operands always run on tensor cores with float32
accumulation; P is cast to V's dtype before ``P @ V``, as in FlashAttention and in
PyTorch's SDPA (the errors then match SDPA's in the same dtype). float32
operands follow ``torch.backends.cuda.matmul.allow_tf32``: ``"tf32"`` when it is set,
``"ieee"`` (exact float32 FMA, no tensor cores) otherwise, so a float32 call is as exact
as PyTorch's own float32 matmul under the same setting. The interpreter always computes
``tl.dot`` in full float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

LOG2E = math.log2(math.e)


@triton.jit
def class_cell(offs, rt, ry, rx, nH, nW, ST, SH, SW):
    """``(t, y, x)`` of the class-local offsets ``offs`` of residue class ``(rt, ry, rx)``,
    whose ``nT x nH x nW`` cells are numbered time-major (strided attention)."""
    return rt + (offs // (nH * nW)) * ST, ry + ((offs // nW) % nH) * SH, rx + (offs % nW) * SW


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """``acc + a @ b``. ``INTERPRET_BF16`` (bfloat16 in Triton's interpreter, whose bfloat16
    ``tl.dot`` multiplies the raw uint16 storage in triton 3.9) multiplies float32 copies:
    bf16 x bf16 products are exact in float32, as on tensor cores."""
    if INTERPRET_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even, as the GPU's ``cvt.rn`` does. Triton 3.9's
    interpreter truncates float32 -> bfloat16, so under ``INTERPRET_BF16`` the float32 value
    is rounded first (then the truncation is exact)."""
    if INTERPRET_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def online_softmax_block(s, m_i, l_i, acc, v, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """One block of keys into the running state of FlashAttention.

    Args:
        s: ``[BLOCK_M, BLOCK_N]`` base-2 logits, ``-inf`` outside the pattern.
        m_i, l_i: ``[BLOCK_M]`` running max and sum.
        acc: ``[BLOCK_M, BLOCK_D]`` float32 running ``sum p * v``.
        v: ``[BLOCK_N, BLOCK_D]`` values of the block.
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # a query can see no key in a block (and in the first blocks at all): subtract 0
    # instead of -inf so exp2 yields 0 rather than NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc = dot(cast(p, v.dtype, INTERPRET_BF16), v, acc, DOT_PRECISION, INTERPRET_BF16)
    return m_new, l_i, acc


@triton.jit
def online_softmax_vector(s, m_i, l_i, acc, v):
    """One key per query (grid's column and time keys) into the running state.

    Args:
        s: ``[BLOCK_M]`` base-2 logits, ``-inf`` where the key is not in the pattern.
        v: ``[BLOCK_M, BLOCK_D]`` each query's value vector.
    """
    m_new = tl.maximum(m_i, s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe)
    l_i = l_i * alpha + p
    acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def object_max_block(s, eligible, key_labels, key_start, a_max, a_arg, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr):
    """Running max logit per object over a block of keys, and the key that attained it.

    Args:
        s: ``[BLOCK_M, BLOCK_N]`` base-2 logits.
        eligible: ``[BLOCK_M, BLOCK_N]`` key in the pattern and (causal affinity) in an
            earlier frame. Unlabelled keys (-1) never match an object.
        key_labels: ``[BLOCK_N]`` object id of each key.
        key_start: the kernel's own index of the block's first key; the block's keys are
            ``key_start + 0 .. BLOCK_N - 1`` (the kernel turns it into a cell index).
        a_max, a_arg: ``[BLOCK_M, BLOCK_O]`` running max logit (``-inf``: none yet) and
            its key (``-1``).

    The key comes from the position returned by the max itself, not from a per-key
    index vector: vectors along the key axis are replicated in the MMA layout and cost
    ``BLOCK_N / 4`` registers each.
    """
    objects = tl.arange(0, BLOCK_O)
    for o in tl.static_range(NUM_OBJ):
        s_o = tl.where(eligible & (key_labels[None, :] == o), s, float("-inf"))
        block_max, block_pos = tl.max(s_o, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = (objects[None, :] == o) & (block_max[:, None] > a_max)
        a_max = tl.where(better, block_max[:, None], a_max)
        a_arg = tl.where(better, key_start + block_pos[:, None], a_arg)
    return a_max, a_arg


@triton.jit
def object_max_vector(s, eligible, key_labels, key_index, a_max, a_arg, BLOCK_O: tl.constexpr):
    """:func:`object_max_block` for one key per query (all ``[BLOCK_M]`` vectors)."""
    objects = tl.arange(0, BLOCK_O)
    better = eligible[:, None] & (key_labels[:, None] == objects[None, :]) & (s[:, None] > a_max)
    a_max = tl.where(better, s[:, None], a_max)
    a_arg = tl.where(better, key_index[:, None], a_arg)
    return a_max, a_arg


@triton.jit
def store_results(
    Out, Lse, Aff, Arg, bn, S, D, query_index, query_valid, m_i, l_i, acc, a_max, a_arg,
    NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):
    """Normalise and write ``out``, ``lse`` and, with objects, ``affinity`` and ``argmax``.

    ``Out`` is a contiguous ``(B*N, S, D)``, ``Lse`` ``(B*N, S)``, ``Aff``/``Arg``
    ``(B*N, O, S)``. ``bn`` is the int64 batch-head index, ``query_index`` ``[BLOCK_M]``
    the flat cell index of each query.
    """
    # every query sees at least itself, so l_i > 0 wherever query_valid
    l_safe = tl.where(query_valid, l_i, 1.0)
    m_safe = tl.where(query_valid, m_i, 0.0)
    out = acc / l_safe[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    row = bn * S + query_index.to(tl.int64)
    out_ptrs = Out + row[:, None] * D + offs_d[None, :]
    tl.store(out_ptrs, cast(out, Out.dtype.element_ty, INTERPRET_BF16), mask=query_valid[:, None] & (offs_d[None, :] < D))
    # m_i and log2(l) are base 2; lse is natural log
    tl.store(Lse + row, (m_safe + tl.log2(l_safe)) * 0.6931471805599453, mask=query_valid)
    if NUM_OBJ > 0:
        objects = tl.arange(0, BLOCK_O)
        found = a_max > float("-inf")
        aff = tl.where(found, tl.exp2(a_max - m_safe[:, None]) / l_safe[:, None], 0.0)
        arg = tl.where(found, a_arg, -1)
        aff_off = (bn * NUM_OBJ + objects[None, :].to(tl.int64)) * S + query_index[:, None].to(tl.int64)
        mask = query_valid[:, None] & (objects[None, :] < NUM_OBJ)
        tl.store(Aff + aff_off, aff, mask=mask)
        tl.store(Arg + aff_off, arg, mask=mask)


# ---------------------------------------------------------------------------------------
# Interpreter twins
# ---------------------------------------------------------------------------------------

_INTERPRETED: dict[int, Any] = {}


def interpreted(kernel: JITFunction):
    """The same kernel run by Triton's interpreter, next to its compiled ``@triton.jit`` self.

    ``TRITON_INTERPRET=1`` turns every kernel of the process into an interpreted one
    (no AOT compile in the same session). Wrapping one kernel by hand in
    :class:`~triton.runtime.interpreter.InterpretedFunction` runs its body in its
    module's globals, where the ``@triton.jit`` helpers it calls are compiled-only
    ``JITFunction`` objects that refuse to run outside a kernel. Here the rewritten body
    runs in a copy of those globals where every ``JITFunction`` is replaced by its own
    interpreted twin (recursively, cached), so kernels and helpers keep one source.

    Uses ``triton.runtime.interpreter.FunctionRewriter``/``InterpretedFunction`` as
    shipped with triton 3.x (checked with 3.9).
    """
    key = id(kernel)
    if key not in _INTERPRETED:
        _INTERPRETED[key] = _make_interpreted(kernel)
    return _INTERPRETED[key]


class _InterpretedLanguage:
    """``triton.language`` as seen by an interpreted twin: its ``@jit`` functions
    (``tl.max``, ``tl.sum``, ``tl.cdiv``, ...) come back interpreted, the rest (builtins,
    which the interpreter patches in place on the real module) is looked up live."""

    def __getattr__(self, name):
        value = getattr(tl, name)
        return interpreted(value) if isinstance(value, JITFunction) else value


_LANGUAGE = _InterpretedLanguage()


def _make_interpreted(kernel: JITFunction):
    from triton.runtime import interpreter

    if kernel.fn.__module__.startswith("triton."):
        # Triton's own library (tl.max, ...) calls only builtins and hands its combine
        # functions to tl.reduce, where the interpreter recognises them by identity to
        # take its numpy fast path: run it as is.
        return interpreter.InterpretedFunction(kernel.fn)

    class _TwinRewriter(interpreter.FunctionRewriter):
        def _compile_and_exec(self, transformed_ast):
            code = compile(transformed_ast, filename=self.filename, mode="exec")
            namespace = {**vars(interpreter), **self.fn.__globals__}
            for name, value in self.fn.__globals__.items():
                if isinstance(value, JITFunction):
                    namespace[name] = interpreted(value)
                elif value is tl:
                    namespace[name] = _LANGUAGE
            # the interpreter finds the module to patch among the kernel's globals
            namespace["__triton_language__"] = tl
            local: dict[str, Callable] = {}
            exec(code, namespace, local)
            return local[self.fn.__name__]

    class _Twin(interpreter.InterpretedFunction):
        def __init__(self, fn):
            super().__init__(fn)
            self.rewriter = _TwinRewriter(fn)
            self._rewritten = None

        def rewrite(self):
            # not the class-wide cache of InterpretedFunction: that one holds bodies bound
            # to the module's (compiled) helpers
            if self._rewritten is None:
                self._rewritten = self.rewriter.rewrite_ast()
            return self._rewritten

    return _Twin(kernel.fn)


# ---------------------------------------------------------------------------------------
# Launch helpers and AOT description
# ---------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for float32 operands (see the module docstring): PyTorch's
    own setting for float32 CUDA matmuls, ``fp32_precision`` where set, else ``allow_tf32``."""
    if dtype != torch.float32:
        return "ieee"  # unused: 16-bit operands always take the tensor-core path
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if setting in ("tf32", "ieee"):
        return setting
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def block_d(D: int) -> int:
    """Head dim padded to a power of two >= 16 (``tl.dot``'s minimum K)."""
    return max(16, triton.next_power_of_2(D))


def block_o(num_objects: int) -> int:
    return max(2, triton.next_power_of_2(max(1, num_objects)))


# An fp32 [BLOCK_M, BLOCK_D] accumulator of at most this many registers per thread keeps
# every configuration spill-free (checked by ``python -m sst_triton.aot``): at D=64 all
# configurations fit, at D=128 only those with 32 * num_warps >= BLOCK_M * 4.
MAX_ACC_PER_THREAD = 32


def queries_per_program(config) -> int:
    kw = config.kwargs
    return kw["BLOCK_M"] if "BLOCK_M" in kw else kw["TILE_H"] * kw["TILE_W"]


def fits(config, block_d: int) -> bool:
    """Whether a configuration's accumulator fits the register budget at head dim ``block_d``."""
    return queries_per_program(config) * block_d <= MAX_ACC_PER_THREAD * 32 * config.num_warps


def configs_for(configs: list, block_d: int, wide_max_warps: Optional[int] = None) -> list:
    """The configurations the autotuner may pick at ``block_d``: those that fit (and, with
    ``wide_max_warps``, use at most that many warps at ``block_d >= 128``), or the smallest
    one when none does (head dims past 128: correct, not spill-checked)."""
    kept = [
        c for c in configs
        if fits(c, block_d) and (wide_max_warps is None or block_d < 128 or c.num_warps <= wide_max_warps)
    ]
    if kept:
        return kept
    return [min(configs, key=lambda c: queries_per_program(c) * block_d / c.num_warps)]


def config_pruner(wide_max_warps: Optional[int] = None):
    """``early_config_prune`` for a forward kernel's autotuner (see :func:`configs_for`)."""

    def prune(configs, named_args, **kwargs):
        return configs_for(list(configs), kwargs.get("BLOCK_D", named_args.get("BLOCK_D")), wide_max_warps)

    return prune


def example_scalars(B: int = 1, N: int = 8, T: int = 4, H: int = 32, W: int = 32, D: int = 64) -> dict[str, int]:
    """Sizes and q/k/v strides of a contiguous ``(B, N, T, H, W, D)`` call (AOT examples)."""
    strides = dict(b=N * T * H * W * D, n=T * H * W * D, t=H * W * D, h=W * D, w=D, d=1)
    out = dict(N=N, T=T, H=H, W=W, D=D)
    for t in ("q", "k", "v"):
        out.update({f"s{t}_{axis}": value for axis, value in strides.items()})
    return out


@dataclass
class AotSpec:
    """How ``python -m sst_triton.aot`` compiles one kernel: as the JIT would for one call.

    Args:
        name: name in the table.
        kernel: the ``@triton.jit`` function.
        pointers: pointer argument -> Triton type (``"*bf16"``, ``"*fp32"``, ``"*i32"``).
        scalars: runtime scalar argument -> example value. Like the JIT, an int equal to 1
            becomes a constexpr and an int divisible by 16 gets ``tt.divisibility=16``
            (pointers are assumed 16-byte aligned), so the AOT build is the one a GPU
            would run for that call.
        constexprs: values of the constexpr arguments that are not autotuned.
        configs: every ``triton.Config`` the autotuner may pick.
        note: what the example call stands for.
    """

    name: str
    kernel: JITFunction
    pointers: dict[str, str]
    scalars: dict[str, Any]
    constexprs: dict[str, Any]
    configs: list = field(default_factory=list)
    note: str = ""

    def compile_args(self, config) -> tuple[dict[str, str], dict[str, Any], dict[tuple, list]]:
        """``(signature, constexprs, attrs)`` for ``ASTSource`` under one ``triton.Config``."""
        names = list(self.kernel.arg_names)
        signature: dict[str, str] = {}
        constexprs = {**self.constexprs, **config.kwargs}
        attrs: dict[tuple, list] = {}
        aligned = [["tt.divisibility", 16]]
        for name in names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in self.pointers:
                signature[name] = self.pointers[name]
                attrs[(names.index(name),)] = aligned
            elif name in self.scalars:
                value = self.scalars[name]
                if isinstance(value, float):
                    signature[name] = "fp32"
                elif value == 1:
                    signature[name] = "constexpr"
                    constexprs[name] = 1
                else:
                    signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                    if value % 16 == 0:
                        attrs[(names.index(name),)] = aligned
            else:
                raise ValueError(f"AotSpec {self.name}: no type or value for argument {name!r}")
        return signature, constexprs, attrs


AOT_HEAD_DIMS = (64, 128)


def forward_aot_specs(
    name: str, kernel: JITFunction, configs: list, scalars: dict, constexprs: dict, note: str,
    wide_max_warps: Optional[int] = None,
):
    """The AOT specs of a forward kernel: a contiguous bf16 ``(1, 8, 4, 32, 32, D)`` call with
    3 objects at each head dim in :data:`AOT_HEAD_DIMS`, with the configurations the
    autotuner may pick there."""
    specs = []
    for d in AOT_HEAD_DIMS:
        specs.append(AotSpec(
            name=f"{name}[d{d}]",
            kernel=kernel,
            pointers=dict(Q="*bf16", K="*bf16", V="*bf16", Out="*bf16", Labels="*i32", Lse="*fp32", Aff="*fp32",
                          Arg="*i32"),
            scalars=dict(example_scalars(D=d), scale_log2=1.0, **scalars),
            constexprs=dict(NUM_OBJ=3, BLOCK_O=4, BLOCK_D=d, DOT_PRECISION="ieee", INTERPRET_BF16=False, **constexprs),
            configs=configs_for(configs, d, wide_max_warps),
            note=f"bf16 (1, 8, 4, 32, 32, {d}) contiguous, 3 objects, {note}",
        ))
    return specs
