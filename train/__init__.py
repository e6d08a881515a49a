"""Meta-training jobs: truncated-BPTT unrolls, the training loop, checkpoints."""
