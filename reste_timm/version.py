"""The package's version, in one place (pyproject.toml reads it; ``reste_timm.__version__`` re-exports it)."""

__version__ = "0.2.0"
