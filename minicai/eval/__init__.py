"""Evaluation only, never training: the judge-free yardstick (yardstick.py: refusal and compliance
detectors on held-out prompts), the evaluation of policies (evaluate.py), BIG-bench read in place
(bigbench.py) and the static HTML report (report.py). Training code never imports this folder: the
measuring stick never chooses training data."""
