"""Pallas kernels (fused chunked SSD scan, 4-bit matmul). Each kernel keeps a pure-JAX reference beside it;
until a kernel lands, nemojax.ssd's XLA chunked SSD is the implementation used everywhere."""
