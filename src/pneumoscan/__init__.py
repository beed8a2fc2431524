"""pneumoscan: pneumonia screening on chest X-rays with deep transfer learning.

    from pneumoscan import load_model
    model = load_model()                 # the bundled default model
    result = model.predict("xray.jpeg")  # Prediction(probability=..., decision=..., status="ok", ...)
"""

__version__ = "0.1.0"

from .predict import Model, Prediction, load_model  # noqa: E402

__all__ = ["Model", "Prediction", "load_model", "__version__"]
