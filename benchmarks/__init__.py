"""Benchmarks of din_kernels: pytest-benchmark suites per op family and the ``make bench`` runner (``run.py``).

This folder imports the package; the package never imports it. Modules:

- ``floor``: the FLOP and byte models of every op and the measured peaks of the device (the ``floor_ms`` column);
- ``cases``: the shape sets, the inputs and every provider of every op (the package's backends and the peers);
- ``measure``: timing (``torch.utils.benchmark`` on the CPU, ``triton.testing.do_bench`` on a GPU) and peak memory;
- ``report``: JSON lines, the markdown tables and the plots (drawn from the JSON);
- ``run``: the command line (``make bench``); ``readme_results``: the README's results section.
"""
