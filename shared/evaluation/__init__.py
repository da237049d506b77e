"""Metrics with bootstrap intervals, calibration, the bag-of-tokens baseline."""
