"""KAN hierarchical weights (Kolmogorov-Arnold networks over row / column codes): the fields, their
splines and the stored `kan` kind; the fitting is methods/kan."""

from .field import KanField, evaluate, field_from_layout, layout_of
from .linear import KanLinear

__all__ = ["KanField", "KanLinear", "evaluate", "field_from_layout", "layout_of"]
