"""The book's experiments: training runs and maps whose numbers are the evidence the chapters show.

Each module writes one ``results/*.json`` (with the command that regenerates it, the machine, the threads and
the wall time) and is run as ``python -m experiments.<name>``; speed and memory live apart, in ``benchmarks/``,
whose ``common`` module also holds the results-file helpers both use (:func:`benchmarks.common.write_results`,
:func:`benchmarks.common.machine_info`).
"""
