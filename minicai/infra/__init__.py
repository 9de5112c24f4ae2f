"""Training plumbing you may skip on a first reading: the training-loop skeleton and run folders
(train.py), command-line parsing (cli.py), torchrun helpers (distributed.py), the fast paths (fast.py,
each tested equal to its plain twin in the reading path), the PPO and reward-model plumbing around
rl.py and losses.py (ppo.py, rm.py), pair labelling around feedback.py (labelling.py), and two
tools (generate.py: talk to a model; lines.py: the README's line counts). The algorithm itself is in
the modules one folder up; file formats are in ../io, evaluation in ../eval, whole-run experiments in
../experiments."""
