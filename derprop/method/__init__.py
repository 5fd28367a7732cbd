"""The method: the paper's equations as functions of tensors, with no config, no files and no processes.

Derivative operators (eq. 2, 10–12: :mod:`~derprop.method.derivatives`), the similarity features
(:mod:`~derprop.method.features`), derivative label propagation (eq. 1, 4: :mod:`~derprop.method.propagation`),
the derivative loss (eq. 3, 8, 9: :mod:`~derprop.method.losses`) and the momentum network's EMA
(:mod:`~derprop.method.momentum`). Explained in the book's maths chapters, from *The ill-posed problem* on.

May import: torch and the modules of this part. Nothing else of derprop: every other part builds on this one.
"""
