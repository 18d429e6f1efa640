"""Loss backends: one file per implementation (torch chunked, Triton, CUDA extension)."""
