"""Model resolution (packaged, local folder, hub id), block discovery, and the shared base model."""

from legend.models.resolve import resolve_model
from legend.models.shared import SharedModel, find_blocks

__all__ = ["SharedModel", "find_blocks", "resolve_model"]
