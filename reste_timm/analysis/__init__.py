"""Analysis: the estimator study, figures and the per-layer model summary."""

from .summary import summary

__all__ = ["summary"]
