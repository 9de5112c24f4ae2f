"""train_rm.py's plumbing: flag checks, the prompt selection, loading (or resuming) the reward
model, its checkpoints and the run summary. The stages themselves are in train_rm.py."""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from ..errors import InputError
from ..io.checkpoint import load_model, load_scalar_model, load_tokenizer
from ..io.data import Prompt, check_prompt_lengths, load_prompts, split
from ..io.files import atomic_write_json
from ..model import ScalarHead, ScalarModel


def check_args(args) -> None:
    """One-line errors for flags that cannot work together (args: train_rm.Args; each flag's own
    range is checked by cli.parse)."""
    a = args.label
    if args.run.fsdp:
        raise InputError("--fsdp: train_rm.py trains the reward model with DDP only")
    if not a.preferences and a.labeller == "revision" and not a.sl_traces:
        raise InputError("--labeller revision needs --sl-traces (train_sl.py's OUT/traces.jsonl)")
    if not a.preferences and a.labeller == "revision" and not Path(a.sl_traces).is_file():
        raise InputError(f"{a.sl_traces}: SL-CAI traces file not found (--sl-traces)")


def select_prompts(a, seed: int) -> list[Prompt]:
    """The train side of data.split over all sources, shuffled by the seed, the first n."""
    prompts = list({p.text: p for spec in a.prompts or ["builtin-red-team", "builtin-helpful"]
                    for p in load_prompts(spec)}.values())  # dedupe across sources
    train, _ = split(prompts, a.held_out_fraction)
    random.Random(seed).shuffle(train)
    train = train[:a.n_prompts] if a.n_prompts else train
    if not train:
        raise InputError("--prompts: no prompts left after removing the held-out ones")
    check_prompt_lengths(train, *load_tokenizer(a.policy))  # a too-long one: its file and line, before any run
    return train


def reward_model(rm_dir: Path, rm_init: str, device) -> tuple[ScalarModel, object, bool]:
    """The checkpoint in rm_dir to resume, else the trunk of rm_init (fp32 master weights) with a
    new head (N(0, 1/sqrt(C+1))). Returns (model, tokenizer, resuming)."""
    resuming = (rm_dir / "train_state.json").exists()
    if resuming:
        rm, tok, _ = load_scalar_model(rm_dir, device=device)
    else:
        trunk, tok, _ = load_model(rm_init, dtype=torch.float32, device=device)
        rm = ScalarModel(trunk, ScalarHead(trunk.cfg.dim, init_std=1 / math.sqrt(trunk.cfg.dim + 1)).to(device))
    if rm.trunk.lm_head is not None:
        # An untied LM head plays no part in the reward (hidden states -> ScalarHead): without a
        # gradient AdamW never moved it anyway, and frozen it is left out by DDP, which would
        # otherwise wait for its gradient (or need find_unused_parameters). It is still saved.
        rm.trunk.lm_head.requires_grad_(False)
    return rm, tok, resuming


def write_summary(out: Path, args, stats: dict, result: dict, times: dict, t_start: float) -> None:
    a = args.label
    summary = {"held_out_accuracy": result["held_out"]["accuracy"], "held_out_pairs": result["held_out"]["pairs"],
               "train_accuracy": result["train"]["accuracy"], "train_pairs": result["train"]["pairs"],
               "held_out_loss": result["held_out"]["loss"], "feedback": stats, "reward_model": result,
               "seconds": {**times, "this_run": time.time() - t_start}, "policy": a.policy,
               "feedback_model": a.feedback_model or a.policy, "rm_init": args.rm.rm_init or a.policy, "cot": a.cot}
    atomic_write_json(out / "summary.json", summary)
    print(json.dumps({k: summary[k] for k in ("held_out_accuracy", "held_out_pairs", "train_accuracy")}
                     | {"order_agreement": stats["order_agreement"], "dropped_identical": stats["dropped_identical"],
                        "seconds": summary["seconds"]}))
