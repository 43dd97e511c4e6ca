"""The commands' logic as library calls: `compress eval` (evaluate.py), `compress bench` (bench.py), `compress sweep`
(sweep.py, sweep_plot.py). The CLI only parses, calls these and presents."""
