"""pneumoscan: pneumonia screening on chest X-rays with deep transfer learning.

    from pneumoscan import load_model
    model = load_model()                 # the bundled default model
    result = model.predict("xray.jpeg")  # Prediction(probability=..., decision=..., status="ok", ...)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Model", "Prediction", "load_model", "__version__"]

_LAZY = {"Model", "Prediction", "load_model"}


def __getattr__(name: str):
    """``Model``, ``Prediction`` and ``load_model`` import torch on first use (PEP 562), not at package import:
    the command line imports this package, and ``pneumoscan --help`` must not wait seconds for torch."""
    if name in _LAZY:
        from . import predict

        value = getattr(predict, name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
