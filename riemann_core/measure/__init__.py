"""The measurement layer that every benchmark, sweep and study shares.

- :mod:`.timing`: wall-clock timing (CUDA-synchronised), the GEMM rate of a run;
- :mod:`.flops`: FLOP counting, ``FlopCounterMode`` plus a table of linear-algebra counts;
- :mod:`.memory`: peak memory of a call, on CUDA and on the host;
- :mod:`.environment`: the record of the machine and code a figure came from;
- :mod:`.problems`: the MLPs measured;
- :mod:`.output`: result files written atomically and read back with checks, figures.

It needs torch only; pandas and matplotlib are imported where a function needs them.
"""
