"""ttfm-distill: distil diffusers flow models into two-timed flow models."""

__version__ = "0.1.0"
