"""lineclip: a CLIP-style dual encoder for Tibetan line images and their transcriptions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lineclip.encoder import LineEncoder, load_encoder

# `import lineclip` stays light (no torch, no transformers): the encoder is imported on first use.
_LAZY = {"load_encoder": "lineclip.encoder", "LineEncoder": "lineclip.encoder"}
__all__ = ["LineEncoder", "__version__", "load_encoder"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lineclip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
