"""Training: one loop (pretrain, prune phase, retrain, scratch), engines (DDP | DeepSpeed),
optimizers and LR schedules."""
