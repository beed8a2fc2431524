"""The HTTP service (``pneumoscan serve``): a FastAPI app around one loaded model, plus its static web page.

FastAPI is an optional dependency (``pip install pneumoscan[serve]``), so nothing outside this package imports it.
"""

from .app import DEFAULT_MAX_UPLOAD, create_app, serve_in_thread

__all__ = ["DEFAULT_MAX_UPLOAD", "create_app", "serve_in_thread"]
