"""ttfm-distill: distil diffusers flow models into two-timed flow models."""

__version__ = "0.1.0"

__all__ = ["TTFMPipeline", "TwoTimeFlowMap"]


def __getattr__(name):  # diffusers and torch load only when these are used (the CLI starts fast)
    if name == "TTFMPipeline":
        from .pipeline import TTFMPipeline

        return TTFMPipeline
    if name == "TwoTimeFlowMap":
        from .student import TwoTimeFlowMap

        return TwoTimeFlowMap
    raise AttributeError(f"module 'ttfm_distill' has no attribute {name!r}")
