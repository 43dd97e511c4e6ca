"""Fast products for the compressed layers: compiled CPU kernels (condensed, CSR and bitmask rows, RPS
weights), Triton kernels for the condensed and row-sparse layers on CUDA, the pure-PyTorch reference and dense
fallbacks, and the dispatch between them (see dispatch.py; on CUDA, cuda_paths.py's table).

Triton is imported only when a CUDA path is first considered; the CPU kernel is compiled on first use.
"""
from compresscli.kernels.dispatch import (PATHS, available_paths, choose_path, condensed_mm, force_path,
                                          sparse_dense, sparse_mm)
from compresscli.kernels.reference import dense_mm, gather_mm, scatter_dense

__all__ = ["PATHS", "available_paths", "choose_path", "condensed_mm", "dense_mm", "force_path", "gather_mm",
           "scatter_dense", "sparse_dense", "sparse_mm"]
