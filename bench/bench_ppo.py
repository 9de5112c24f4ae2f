"""Time one PPO iteration of train_ppo.py on the embedded model, phase by phase; with --trl-python,
beside TRL 0.19.1's PPOTrainer in the same run.

    python bench/bench_ppo.py [--iterations 3] [--value-model shared separate] [--bf16] [--reward-model PATH]
    python bench/bench_ppo.py --trl-python /tmp/trlvenv/bin/python [--dtypes fp32 bf16] [--iterations 3]

Setting (the issue's): 8 prompts x up to 64 new tokens, 4 PPO epochs, one minibatch, fp32 weights,
policy = reference = SmolLM2-135M-Instruct (embedded), a 135M reward model. Without --reward-model
the reward model is a stand-in of the same size and cost: the embedded trunk with a random reward
head (its scores are meaningless; only the time matters here).

The script runs train_ppo.main itself (the code being measured is the training loop, not a copy)
for --iterations iterations and reads the per-phase times it logs in metrics.jsonl:
  rollout            batched generation (static KV cache, left padding)
  score/ref/values   reward model + reference + policy/value forwards over prompt + response
  update             GAE + 4 epochs of forward/backward/Adam
The first iteration is a warm-up (allocator, oneDNN kernel selection) and is reported apart; the
figure is the mean of the others. Model loading is not counted.

Without --trl-python only our own phases are timed (no ratio: a reference that is not measured in
the same run is not printed).

--trl-python PATH measures the reference in the same run. PATH is the python of a separate venv
(the project never imports TRL):
    python -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl==0.19.1 \
        transformers==4.53.3 datasets accelerate
For each dtype of --dtypes (fp32, bf16) the script runs, one after the other on the same machine:
  TRL    bench/trl_ppo.py in a subprocess of PATH: PPOTrainer with policy, ref_policy (a second copy),
         reward_model and value_model (TRL always trains a separate value model)
  ours   train_ppo.main in this process, --value-model separate (the like-for-like row) and shared
Both sides get the same weights (our save_hf of the embedded model; the reward model converted to
an HF LlamaForSequenceClassification with score.weight = our reward head, see trl_reward_model),
the same 8 prompts every iteration, rendered to the same token ids by our tokenizer (a prompt file
with --held-out-fraction 0 on our side, the ids on TRL's), up to 64 new tokens stopping at the
end-of-turn token, 4 PPO epochs, 1 minibatch, temperature 0.7, beta 0.05, lr 1e-5 constant, Adam eps
1e-5, missing-EOS penalty 1.0 subtracted, the reward read at the last generated token of a truncated
response (our --score-truncated as_is, as TRL). bf16: ours = bf16 autocast around every forward
(rollout included), fp32 weights; TRL = TrainingArguments(bf16=True), i.e. accelerate's autocast
around the prepared (policy + value) model's forward only: the update's forwards run in bf16, its
rollout (generate), reference and reward forwards, which call the models directly, stay fp32.
Sampling differs between the two (different RNGs and kernels), so responses stop at different
points: each row reports its mean response length. The table gives seconds per iteration, the mean
of the iterations after the first (a warm-up), and the ratio TRL / ours.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_ppo  # noqa: E402
from minicai.io.checkpoint import load_model, save_hf  # noqa: E402
from minicai.io.data import BUILTIN_HELPFUL, BUILTIN_RED_TEAM  # noqa: E402
from minicai.model import ScalarHead  # noqa: E402

PHASES = [("rollout", "time/rollout"), ("score/ref/values", "time/score_ref_values"), ("update", "time/update"),
          ("iteration (total)", "time/iteration")]
TRL_SCRIPT = Path(__file__).resolve().with_name("trl_ppo.py")


def stand_in_rm(folder: Path) -> Path:
    """The embedded model's trunk with a random reward head, N(0, 1/sqrt(C+1)): a bench stand-in."""
    trunk, tok, _ = load_model(None)
    torch.manual_seed(0)
    head = ScalarHead(trunk.cfg.dim, init_std=1.0 / (trunk.cfg.dim + 1) ** 0.5)
    return save_hf(folder, trunk, tok, heads={"reward": head}, meta={"note": "bench stand-in, random head"})


def trl_reward_model(rm: Path, folder: Path) -> tuple[Path, float]:
    """A copy of our reward model folder rm (save_hf with reward_head.safetensors) that HF's
    AutoModelForSequenceClassification loads: LlamaForSequenceClassification, num_labels 1, the trunk's
    tensors as they are, score.weight (1, C) = our head's proj.weight * gain. Our head computes
    (w . h + b) * gain + bias; HF's score layer has no bias, so the constant offset b * gain + bias is
    dropped (it is 0 for the stand-in; for a trained model every score shifts by it, values too).
    Returns (folder, the dropped offset)."""
    folder.mkdir(parents=True, exist_ok=True)
    head = load_file(str(rm / "reward_head.safetensors"))  # proj.weight (1, C), proj.bias (1,), gain (), bias ()
    gain = head.get("gain", torch.ones(()))
    offset = float(head["proj.bias"].reshape(()) * gain + head.get("bias", torch.zeros(())))
    state = {k: v for k, v in load_file(str(rm / "model.safetensors")).items() if k != "lm_head.weight"}
    state["score.weight"] = (head["proj.weight"].float() * gain).to(state["model.embed_tokens.weight"].dtype)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((rm / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(rm / name, folder / name)
    return folder, offset


def bench_prompts(tok, folder: Path) -> tuple[Path, Path]:
    """The 8 prompts both sides read every iteration (the first 4 builtin red-team and the first 4
    builtin helpful prompts): prompts.jsonl for train_ppo --prompts (with --held-out-fraction 0 all 8
    are each iteration's batch) and prompts.json, the same texts rendered by our chat template to
    token ids, with the end-of-turn (stop) id, for trl_ppo.py."""
    texts = list(BUILTIN_RED_TEAM[:4]) + list(BUILTIN_HELPFUL[:4])
    jsonl = folder / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    ids = [tok.render([{"role": "user", "content": t}], add_generation_prompt=True)[0] for t in texts]
    if len(tok.stop_ids) != 1:
        raise SystemExit(f"our tokenizer stops on {tok.stop_ids}; TRL's stop_token_id takes one id")
    spec = folder / "prompts.json"
    spec.write_text(json.dumps({"texts": texts, "input_ids": ids, "stop_token_id": tok.stop_ids[0]}))
    return jsonl, spec


def run(value_model: str, rm: Path, out: Path, args, bf16: bool | None = None, extra=()) -> list[dict]:
    bf16 = args.bf16 if bf16 is None else bf16
    argv = ["--out", str(out), "--overwrite", "--reward-model", str(rm), "--iterations", str(args.iterations),
            "--batch-size", "8", "--max-new-tokens", "64", "--ppo-epochs", "4", "--num-minibatches", "1",
            "--value-model", value_model, "--save-every", "1000000", "--sample-every", "1000000", "--device", "cpu",
            "--seed", str(args.seed)] + (["--bf16"] if bf16 else []) + \
        (["--threads", str(args.threads)] if args.threads else []) + \
        (["--fused-logprobs"] if args.fused_logprobs else []) + list(extra)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its log, tqdm
        train_ppo.main(argv)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    shutil.rmtree(out)  # its checkpoints (policy, value model, optimizer: ~4 GB) go at once
    return rows


def run_trl(python: str, policy: Path, rm: Path, prompts: Path, out: Path, bf16: bool, args) -> tuple[dict, list[dict]]:
    """bench/trl_ppo.py in a subprocess of the TRL venv's python; returns (header, per-iteration rows)."""
    cmd = [python, str(TRL_SCRIPT), "--policy", str(policy), "--reward-model", str(rm), "--prompts", str(prompts),
           "--iterations", str(args.iterations), "--seed", str(args.seed), "--out-jsonl", str(out)] + \
        (["--bf16"] if bf16 else []) + (["--threads", str(args.threads)] if args.threads else [])
    log = out.with_suffix(".log")
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"TRL run failed (exit {rc}): {' '.join(cmd)}\n{tail}")
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    return rows[0], rows[1:]


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def show_phases(title: str, rows: list[dict]) -> None:
    timed = rows[1:]
    eos = f", stopped {mean(timed, 'response/eos_fraction'):.0%}" if "response/eos_fraction" in timed[0] else ""
    print(f"\n{title}  (mean of {len(timed)} iterations after 1 warm-up; mean response length "
          f"{mean(timed, 'response/length'):.1f} tokens{eos})")
    for name, key in PHASES:
        print(f"  {name:<18} {mean(timed, key):7.2f} s   (warm-up {rows[0][key]:6.2f} s)")


def compare(args, tmp: Path) -> list[dict]:
    """--trl-python: TRL and ours on the same weights, prompts and settings, for each of --dtypes."""
    model, tok, _ = load_model(None)
    policy = save_hf(tmp / "policy", model, tok, meta={"note": "bench: the embedded model"})
    del model
    rm = Path(args.reward_model) if args.reward_model else stand_in_rm(tmp / "rm")
    trl_rm, offset = trl_reward_model(rm, tmp / "rm-trl")
    print(f"reward model: {rm if args.reward_model else 'stand-in (embedded trunk + random head, same cost)'}; "
          f"TRL's copy: LlamaForSequenceClassification, score.weight = our head"
          + (f" (its constant offset {offset:+.4f} dropped: HF's score layer has no bias)" if offset else ""))
    jsonl, spec = bench_prompts(tok, tmp)
    lens = [len(p) for p in json.loads(spec.read_text())["input_ids"]]
    print(f"prompts: the same 8 each iteration, {min(lens)}-{max(lens)} tokens ({jsonl})")
    ours_extra = ["--prompts", str(jsonl), "--held-out-fraction", "0", "--no-eos-penalty", "1.0",
                  "--score-truncated", "as_is", "--lr", "1e-5"]
    results = []
    for dtype in args.dtypes:
        bf16 = dtype == "bf16"
        print(f"\n==== {dtype}: load average {os.getloadavg()[0]:.2f} before TRL", flush=True)
        t = time.perf_counter()
        header, trl_rows = run_trl(args.trl_python, policy, trl_rm, spec, tmp / f"trl-{dtype}.jsonl", bf16, args)
        print(f"TRL {header['trl']}, transformers {header['transformers']}, torch {header['torch']}, "
              f"{header['threads']} threads, accelerate mixed_precision={header['mixed_precision']}, "
              f"weights {header['param_dtype']} ({time.perf_counter() - t:.0f} s with loading)")
        show_phases(f"TRL PPOTrainer ({dtype})", trl_rows)
        results.append({"dtype": dtype, "side": "trl", "value_model": "separate", "rows": trl_rows})
        for vm in args.value_model:
            print(f"\n---- load average {os.getloadavg()[0]:.2f} before ours --value-model {vm}", flush=True)
            rows = run(vm, rm, tmp / f"ppo-{dtype}-{vm}", args, bf16=bf16, extra=ours_extra)
            show_phases(f"ours --value-model {vm} ({dtype})", rows)
            results.append({"dtype": dtype, "side": "ours", "value_model": vm, "rows": rows})
    print(f"\n{'setting':<50} {'TRL s/it':>9} {'ours s/it':>10} {'TRL/ours':>9} {'TRL len':>8} {'ours len':>9}")
    for dtype in args.dtypes:
        trl = next(r for r in results if r["dtype"] == dtype and r["side"] == "trl")["rows"][1:]
        for r in results:
            if r["dtype"] == dtype and r["side"] == "ours":
                ours = r["rows"][1:]
                name = f"{dtype}, ours --value-model {r['value_model']}" + \
                    (" (like-for-like)" if r["value_model"] == "separate" else "")
                print(f"{name:<50} {mean(trl, 'time/iteration'):9.2f} {mean(ours, 'time/iteration'):10.2f} "
                      f"{mean(trl, 'time/iteration') / mean(ours, 'time/iteration'):8.2f}x "
                      f"{mean(trl, 'response/length'):8.1f} {mean(ours, 'response/length'):9.1f}")
    print("(s/it: mean of the iterations after the first; len: mean response tokens, incl. the stop token. "
          "Responses are sampled independently on each side and stop at different points.)")
    print(f"load average after the run {os.getloadavg()[0]:.2f}")
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=3, help="iterations per setting; the first is a warm-up")
    ap.add_argument("--value-model", nargs="+", default=None, choices=["shared", "separate"],
                    help="our value-model settings (default: shared separate; with --trl-python: separate shared)")
    ap.add_argument("--reward-model", default=None, help="a real reward model folder (default: a same-size stand-in)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay fp32); the issue's figure is fp32")
    ap.add_argument("--trl-python", default=None,
                    help="python of a venv with trl 0.19.1 (see above): measure TRL's PPOTrainer in the same run")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16"],
                    help="with --trl-python: the precisions to compare, in order (default: fp32, or bf16 with --bf16)")
    ap.add_argument("--save-json", default=None, help="with --trl-python: write every measured row to this JSON file")
    ap.add_argument("--work-dir", default=None,
                    help="parent folder for the weight copies and run folders (~6 GB at peak; default: $TMPDIR)")
    ap.add_argument("--fused-logprobs", action="store_true",
                    help="our side with train_ppo.py --fused-logprobs (the LM head fused with the log-softmax)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, 2 here)")
    args = ap.parse_args()
    if args.iterations < 2:
        ap.error("--iterations must be at least 2 (the first one is a warm-up)")
    if args.trl_python is None and (args.dtypes or args.save_json):
        ap.error("--dtypes and --save-json go with --trl-python")
    args.dtypes = args.dtypes or (["bf16"] if args.bf16 else ["fp32"])
    args.value_model = args.value_model or (["separate", "shared"] if args.trl_python else ["shared", "separate"])
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average before the run {os.getloadavg()[0]:.2f}")
    if args.trl_python:
        print(f"setting: 8 prompts x up to 64 new tokens, 4 PPO epochs, 1 minibatch, {' then '.join(args.dtypes)}, "
              f"embedded SmolLM2-135M-Instruct; TRL 0.19.1 PPOTrainer ({args.trl_python}) and ours"
              f"{' (--fused-logprobs)' if args.fused_logprobs else ''}, in this run")
        with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
            results = compare(args, Path(tmp))
        if args.save_json:
            Path(args.save_json).write_text(json.dumps(results, indent=1))
        return 0
    print(f"setting: 8 prompts x up to 64 new tokens, 4 PPO epochs, 1 minibatch, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, embedded SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        rm = Path(args.reward_model) if args.reward_model else stand_in_rm(Path(tmp) / "rm")
        print(f"reward model: {rm if args.reward_model else 'stand-in (embedded trunk + random head, same cost)'}")
        for vm in args.value_model:
            rows = run(vm, rm, Path(tmp) / f"ppo-{vm}", args)
            timed = rows[1:]
            print(f"\n--value-model {vm}  (mean of {len(timed)} iterations after 1 warm-up; "
                  f"mean response length {sum(r['response/length'] for r in timed) / len(timed):.1f} tokens)")
            for name, key in PHASES:
                mean_ = sum(r[key] for r in timed) / len(timed)
                print(f"  {name:<18} {mean_:7.2f} s   (warm-up {rows[0][key]:6.2f} s)")
            print("  (for a ratio, measure TRL in the same run: --trl-python PATH)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
