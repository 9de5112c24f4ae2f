"""Plumbing you may skip on a first reading: model files (GGUF, HF folders, tokenizers), prompt
and data files, run folders and resume, atomic writes, distributed helpers, fast paths (each
tested equal to its plain twin in the reading path), evaluation orchestration, the report and
the pipeline. The algorithm itself is in the modules one folder up."""
