"""vlpatch: keep vision tokens whole when LLaMA-Factory, Unsloth, TRL and ms-swift cut multimodal samples.

    import vlpatch
    vlpatch.apply()          # or VLPATCH=1 in the environment, no code change

Importing vlpatch and calling apply() imports no torch, transformers or trainer: each patch attaches
when its upstream module is imported (see compat_matrix.yaml).
"""

from ._version import __version__
from .engine import apply, revert, status
from .errors import SampleError, UnknownUpstreamError, VLPatchError


def __getattr__(name):  # POLICIES lives in the core, which the start-up path does not import
    if name == "POLICIES":
        from .core import POLICIES

        return POLICIES
    raise AttributeError(f"module 'vlpatch' has no attribute {name!r}")

__all__ = ["apply", "revert", "status", "POLICIES", "SampleError", "UnknownUpstreamError", "VLPatchError", "__version__"]
