"""Whole runs: the one-command pipeline (pipeline.py: SL-CAI -> feedback + RM -> PPO -> DPO ->
evaluation -> report) and the course experiments that compare runs (compare.py: PPO vs RLOO vs
GRPO; ablations.py; depth.py: alignment depth, Qi et al. 2024)."""
