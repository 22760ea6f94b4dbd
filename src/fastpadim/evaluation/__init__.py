"""Evaluation: MVTec AD style data sets, metrics, the paper's protocols and ablations, reports, and the demo.

Nothing in the root package imports this package; the command line (``fastpadim evaluate``, ``fastpadim demo``)
and the benchmarks do.
"""
