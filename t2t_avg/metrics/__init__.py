"""Metric points from event files and Keras logs, aligned to checkpoints, turned into weights."""
