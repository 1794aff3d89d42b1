"""Transformer: the FlexVAR model, teacher forcing, training loop, run setup and checkpoint.

Step schedules (training sampler and inference schedules) live in flexvar/schedules.py."""
