"""FlexVAR: the library (no MLflow, Prefect, Ray or DVC imports). Subpackages follow the data flow:
data -> tokenizer -> transformer -> generation -> evaluation; cli is the `flexvar` command; shared
modules (config, checkpoint, optim, device, distributed, seeding, errors, ...) sit at the top."""
