"""What a user sees while a run trains and after.

Progress bars (progress.py), grids (grids.py), throughput, `data.png` and the run summary (monitor.py), and the GPU
peaks behind MFU (peak_flops.py).

Nothing is imported here: the data layer takes its progress bar from progress.py without loading the loggers.
"""
