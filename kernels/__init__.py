"""Compiled kernels and their references: Numba preprocessing, the dropout-mask RNG, the fused Triton
ensemble x MC-dropout kernel, and the torch reference / CPU path."""
