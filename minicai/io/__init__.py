"""File formats and files: GGUF and HF checkpoints (gguf.py, checkpoint.py, quant.py), the chat
tokenizer (tokenizer.py), prompt sources and data files (data.py), run folders, JSONL and experiment
outputs (files.py), constitution files (constitution_files.py) and SL-CAI traces (traces.py). The
reading path imports two types from here: data.Prompt and tokenizer.ChatTokenizer."""
