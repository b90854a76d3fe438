"""Pallas kernels, each with a pure-JAX reference beside it and interpret-mode tests on CPU:

    pallas_kernels.ssd      fused chunked SSD scan, forward + custom-VJP backward (TPU form with a sequential
                            chunk axis and VMEM state carry; GPU form with parallel chunks + XLA state passing)
    pallas_kernels.matmul4  x @ W4 with NVFP4 or int4 weights dequantized in the kernel, fp32 accumulation

The model uses the SSD kernel with `ssd_impl: pallas` (compiled on TPU/GPU, interpreted elsewhere); the XLA
chunked SSD in nemojax.ssd stays the default and the fallback.
"""
