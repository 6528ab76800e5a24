"""The stability study (``energy-train compare``): strategies x settings x seeds on the same
data and initial weights, and a report of what they did.

    compare.py    the runs: specs, presets, seeds, --init-from / pretraining, worker processes
    analysis.py   the numbers: spikes, stalls, lag effect, drift, identity of runs, per spec
    report.py     the markdown: a conclusion written from the numbers, the tables
    plots.py      the figure

It runs the trainer (``energy_train.trainer.train``) like any user of it. The entry points
are ``energy_train.study.compare.compare`` and ``.report_again``.
"""
