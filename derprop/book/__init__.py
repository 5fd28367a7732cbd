"""The book's helpers: how the chapters show, word and source what the other parts compute.

Tables, figures and escaping (:mod:`~derprop.book.display`), the sentences written from numbers
(:mod:`~derprop.book.findings`), where a number comes from (:mod:`~derprop.book.sources`), reports of runs
and results files (:mod:`~derprop.book.report`, :mod:`~derprop.book.glance`), the maths chapters' example
(:mod:`~derprop.book.examples`), the DLP map (:mod:`~derprop.book.dlp_map`), the pseudo-label viewer
(:mod:`~derprop.book.viewer`) and the CPU runs the chapters load (:mod:`~derprop.book.runs`,
``python -m derprop.book.runs``). Explained in the chapters that use them.

May import: every other part, :mod:`derprop.errors` and :mod:`derprop.provenance`; nothing imports it but
the commands (``derprop.train`` prints its IoU table).
"""
