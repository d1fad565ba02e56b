"""Evaluation of a trained model: features, the linear protocol, kNN, the
run-level comparison against baselines, the checkpoint watcher, monitors.
"""
