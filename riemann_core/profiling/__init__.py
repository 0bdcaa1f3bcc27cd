"""Measuring the methods: timing, FLOP and memory counts, sweeps, fits, reports and the
``riemann-bench`` command line (:mod:`riemann_core.profiling.cli`)."""
