"""The per-layer benchmark behind ``lorafuse bench``, in the package so that it works from an
installed wheel (the repository's ``benchmarks/`` keeps the other benchmarks and the results, and
imports this one).

    options.py    the command-line options (no torch: ``lorafuse bench --help`` answers at once)
    providers.py  every implementation of one patched linear the benchmark compares
    run.py        the sweep: timing, peaks, roofline, CSV rows, plots
    load.py       how busy the machine was during a timing
"""
