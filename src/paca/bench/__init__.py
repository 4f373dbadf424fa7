"""`paca bench`: the benchmark harness (presets, methods, measurements, searches, report).

cli.py        flags and suites                     settings.py  what a run measures, checked; the device
presets.py    model shapes                         methods.py   full, lora, dora, paca, floor, qlora, qpaca, ...
measure.py    one timed step and its byte / operator accounting (flops.py: the FLOP formulas)
trainees.py   the methods built resident together or alone, the token batch
results.py    results by method and how a failure is recorded (progress.py: the status line)
suite.py      runs the parts in order: step_time.py (fig2, summarised by ratios.py), profile.py,
              max_seq.py (table4) and throughput.py (fig3) over fitting.py and search.py (out of memory as data)
report.py     console and markdown tables, JSON          plots.py  PNG plots
"""
