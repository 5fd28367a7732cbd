"""Training: what a run is and how it is carried out safely.

The config (frozen dataclasses, YAML, the paper-vs-release switches: :mod:`~derprop.training.config`,
:mod:`~derprop.training.configfile`, :mod:`~derprop.training.tables`), the network
(:mod:`~derprop.training.backbones`, :mod:`~derprop.training.model`), the method applied to a batch
(pseudo-labels, eq. 5: :mod:`~derprop.training.pseudo_labels`; the objective, eq. 7/8:
:mod:`~derprop.training.objective`), the trainer and its schedule, data loaders, processes and guards,
evaluation and metrics, and run safety (run folders, checkpoints, atomic writes, output checks, the
command-line front). Explained in the book chapters *Paper vs released code*, *Training on a CPU* and
*Full reproduction on a GPU*.

May import: :mod:`derprop.method`, :mod:`derprop.data`, :mod:`derprop.errors`, :mod:`derprop.provenance`
and the modules of this part.
"""
