"""Talk to a model: python -m minicai.infra.generate --prompt "What is the capital of France?"

Loads the embedded SmolLM2-135M-Instruct by default (or --model PATH: a .gguf file or an HF
folder, e.g. a minicai checkpoint), renders the prompt in the checkpoint's chat format, and
prints the reply. Greedy unless --temperature > 0.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from ..errors import InputError
from ..io.checkpoint import EMBEDDED_NAME, load_model
from ..io.quant import apply_quantize
from ..sample import generate
from .devices import add_device_args, resolve_device
from .fast import compiled_decode_one_token


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minicai.infra.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", required=True,
                   help="user message; repeat the flag to generate for several prompts in one batch")
    p.add_argument("--model", default=EMBEDDED_NAME,
                   help=f"a .gguf file, an HF model folder, or '{EMBEDDED_NAME}' (the embedded default)")
    p.add_argument("--system", default=None,
                   help="system message (default: the checkpoint template's own default, if any)")
    p.add_argument("--raw", action="store_true",
                   help="feed the prompt text as-is, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; otherwise sample at this temperature")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="replies per prompt")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text")
    p.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print tokens/s to stderr")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int8+fused"],
                   help="load-time transform for faster decoding (minicai/io/quant.py; never saved): int8 = "
                        "weight-only int8 matrices for few-row steps (batch-1 decoding about 2.4x faster on CPU); "
                        "int8+fused = also one matrix for Q/K/V and one for gate/up (best for float32 at batch "
                        "16); none = the weights as loaded")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (about a minute first; pays off on long runs)")
    add_device_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device, dtype = resolve_device(args.device, args.dtype)
        model, tok, _ = load_model(args.model, dtype=dtype, device=device)
        model = apply_quantize(model, args.quantize, inplace=True)  # after the move to the device (buffers stay put)
        prompts = []
        for text in args.prompt:
            if args.raw:
                prompts.append(tok.encode(text))
            else:
                msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
                       [{"role": "user", "content": text}]
                prompts.append(tok.render(msgs, add_generation_prompt=True)[0])
        t0 = time.perf_counter()
        gen = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, stop_ids=tok.stop_ids, stop_strings=args.stop, tokenizer=tok,
                       n=args.num_samples, seed=args.seed, pad_id=tok.pad_id,
                       decode=compiled_decode_one_token() if args.compile else None)
        dt = time.perf_counter() - t0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    texts = gen.texts(tok)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- [{i // args.num_samples}.{i % args.num_samples}]")
        print(text.strip())
    if args.stats:
        n_tok = int(gen.mask.sum())
        print(f"{n_tok} tokens in {dt:.2f}s ({n_tok / dt:.1f} tok/s, {device}, {dtype})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
