"""Training one cell: the loop, its schedule, dead-latent tracking, checkpoints and resume."""
