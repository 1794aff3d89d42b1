"""Transformer: the FlexVAR model, teacher forcing, step schedules, training loop and checkpoint."""
