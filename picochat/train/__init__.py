"""Training: the one loop, schedules, checkpoints and the stage commands."""
