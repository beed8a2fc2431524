"""The HTTP service (``pneumoscan serve``): a FastAPI app around one loaded model, plus its static web page.

FastAPI is an optional dependency (``pip install pneumoscan[serve]``), so nothing outside this package imports it,
and this package imports it only when ``create_app`` or ``serve_in_thread`` is used: ``pneumoscan.cli.serve``
(the command-line options) stays light.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_UPLOAD", "create_app", "serve_in_thread"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
