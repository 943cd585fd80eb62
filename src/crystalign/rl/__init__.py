"""Inference-time RL (OMatG-IRL): GRPO + PPO on a base model's velocity field.

``config`` (RLConfig, device check) → ``rollout`` (the Policy and its rollout) → ``trainer`` (RLTrainer,
make_policy) with ``checkpoints`` (RL checkpoint reading, run-folder and resume checks), ``monitoring`` (history
statistics) and ``distributed`` (rank helpers); ``policy``, ``objective``, ``schedules`` and ``scale`` hold the
transitions, losses, noise schedules and the velocity-annealing network.
"""
