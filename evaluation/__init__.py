"""Evaluation: accuracy, NLL and calibration of any head, from a state or a checkpoint."""
