"""Serving artifacts: ``vfocal export`` writes them (``writer``), ``load`` runs them with jax alone.

Importing this package imports only jax and NumPy: ``vfocal_jax.export.load(OUT)`` is the reference
client for machines without Flax. The writer (Flax, TensorFlow) is ``vfocal_jax.export.writer``.
"""
from vfocal_jax.export.runtime import ExportedModel, load, read_export_card

__all__ = ["ExportedModel", "load", "read_export_card"]
