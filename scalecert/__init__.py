"""ScaleCert study: certified detection of adversarial patches with sparse superficial layers."""

from .defense import certify, detect  # noqa: F401
from .models import load_model  # noqa: F401

__version__ = "0.1.0"
