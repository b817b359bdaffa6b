"""fastes: Evolution Strategies fine-tuning of language models at the cost of batched inference."""

from __future__ import annotations

from fastes import noise
from fastes._backend import backends

__version__ = "0.1.0"
__all__ = ["noise", "backends", "__version__"]
