"""simcse-kernels: fused contrastive (InfoNCE / SimCSE / MixCSE) losses that never build N x M.

    from simcse_kernels import FusedInfoNCE, fused_info_nce
"""

__version__ = "0.1.0"  # first: simcse_kernels.environment reads it while the imports below run

from .backends import available_backends
from .errors import BackendUnavailableError, DoubleBackwardError, SelfCheckError
from .functional import fused_info_nce
from .module import FusedInfoNCE
from .options import InfoNCEOptions
from .reference import info_nce_reference

__all__ = [
    "BackendUnavailableError",
    "DoubleBackwardError",
    "FusedInfoNCE",
    "InfoNCEOptions",
    "SelfCheckError",
    "available_backends",
    "fused_info_nce",
    "info_nce_reference",
]
