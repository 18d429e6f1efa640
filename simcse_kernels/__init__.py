"""simcse-kernels: fused contrastive (InfoNCE / SimCSE / MixCSE) losses that never build N x M.

    from simcse_kernels import FusedInfoNCE, fused_info_nce
"""

from .backends import available_backends
from .errors import BackendUnavailableError, SelfCheckError
from .functional import fused_info_nce
from .module import FusedInfoNCE
from .options import InfoNCEOptions
from .reference import info_nce_reference

__all__ = [
    "BackendUnavailableError",
    "FusedInfoNCE",
    "InfoNCEOptions",
    "SelfCheckError",
    "available_backends",
    "fused_info_nce",
    "info_nce_reference",
]
__version__ = "0.1.0"
