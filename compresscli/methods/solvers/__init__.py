"""The one-shot solvers the calibration-driven methods share: input statistics from calibration data
(activation_stats.py), the OBS solver of SparseGPT (obs.py), and the driver that solves layers in forward
order (one_shot.py)."""
