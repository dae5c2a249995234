"""The wrappers the engine puts in place of upstream's objects (imported when a patch attaches).

wrapt's FunctionWrapper keeps upstream's signature and `__wrapped__`; the two classes below add pickling
by name, so patched functions and methods cross into datasets' worker processes.
"""

from __future__ import annotations

import importlib

import wrapt


class BoundPatched(wrapt.BoundFunctionWrapper):
    """A patched method bound to an instance, picklable as `getattr(instance, name)`.

    datasets pickles (and hashes) the function it maps: `processor.preprocess_dataset` must survive
    being sent to `num_proc` worker processes, where it resolves to the (patched) class attribute.
    """

    def __reduce_ex__(self, protocol):
        return getattr, (self.__self__, self.__name__)


class Patched(wrapt.FunctionWrapper):
    __bound_function_wrapper__ = BoundPatched

    def __reduce_ex__(self, protocol):
        return _resolve, (self.__module__, self.__qualname__)


def _resolve(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


resolve_path = wrapt.resolve_path
