"""4-bit weight matmul (NVFP4 and int4) in Pallas with pack/unpack helpers and a pure-JAX reference."""

from pallas_kernels.matmul4.formats import Packed4, dequantize, matmul4_reference, quantize
from pallas_kernels.matmul4.kernel import matmul4

__all__ = ["Packed4", "quantize", "dequantize", "matmul4", "matmul4_reference"]
