"""Sparse spatiotemporal attention (grid, local cube, strided) with fused object affinities."""
from .merge import merge_attention
from .ops import grid_attention, local_attention, sparse_attention, strided_attention
from .patterns import Pattern

__all__ = ["grid_attention", "local_attention", "strided_attention", "sparse_attention", "merge_attention", "Pattern"]
__version__ = "0.1.0"
