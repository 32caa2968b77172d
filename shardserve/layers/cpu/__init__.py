"""CPU kernels for the decode step (small-batch GEMV, RMSNorm, rotary, SiLU-and-mul, paged decode attention), built
from kernels.c at first use; see ops.py for why and build.py for how."""
