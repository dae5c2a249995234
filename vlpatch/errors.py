"""vlpatch's own errors and the names of its policies: what the start-up path needs, and nothing else."""

POLICY_NAMES = ("drop", "drop_media", "shrink", "error")  # core.POLICIES holds their implementations, in this order


class VLPatchError(Exception):
    """Base class of vlpatch's own errors."""


class UnknownUpstreamError(VLPatchError):
    """A process that asked for protection imported upstream code that no patch of vlpatch can attach to
    (code no tested release has, a missing target, a release outside every range); the message names the
    release and the ways on."""


class SampleError(VLPatchError):
    """A sample cannot be used as it is; the message names it."""

    def __init__(self, sample: str, reason: str, detail: str = ""):
        self.sample = sample
        self.reason = reason
        self.detail = detail
        super().__init__(f"vlpatch: sample {sample}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # pickled whole (a worker process, a copy): Exception's own keeps only the message
        return type(self), (self.sample, self.reason, self.detail)


def unreadable_media(exc: BaseException) -> bool:
    """A media file that cannot be read (missing, truncated, not an image, a decompression bomb): bad
    input, dropped and reported (or an error under policy `error`), never a crash deep in the model."""
    return isinstance(exc, OSError) or type(exc).__name__ in ("UnidentifiedImageError", "DecompressionBombError")
