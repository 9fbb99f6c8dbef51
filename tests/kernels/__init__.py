"""Kernel tests: Pallas kernels (interpret mode on CPU) against their pure-JAX references."""
