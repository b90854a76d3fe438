"""Pallas kernels, each tested against a pure-JAX reference in interpret mode on CPU:

    pallas_kernels.ssd      fused chunked SSD scan, forward + custom-VJP backward (TPU form with a sequential
                            chunk axis and VMEM state carry; GPU form with parallel chunks + XLA state passing)
    pallas_kernels.matmul4  x @ W4 with NVFP4 or int4 weights dequantized in the kernel, fp32 accumulation

The SSD kernel is the 'pallas' implementation of nemojax.ssd (model: `runtime.ssd_impl: pallas`; compiled on
TPU/GPU, interpreted elsewhere), whose reference and XLA chunked form (the default) live in nemojax/ssd.
"""
