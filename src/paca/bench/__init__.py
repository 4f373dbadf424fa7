"""`paca bench`: the benchmark harness (presets, methods, measurements, searches, report).

presets.py  model shapes        methods.py  full, lora, dora, paca, floor, qlora, qpaca
measure.py  one timed step and its byte/FLOP accounting
search.py   max sequence length and throughput, out-of-memory as a data point
suite.py    fig2 / table4 / fig3 over the methods       report.py  tables, JSON, plots
cli.py      flags and suites
"""
