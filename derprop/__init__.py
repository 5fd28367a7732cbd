"""DerProp: semi-supervised semantic segmentation via derivative label propagation.

The package is the single source of truth for the book: each module's
docstrings name the chapter that explains it.
"""

__version__ = "0.1.0"
