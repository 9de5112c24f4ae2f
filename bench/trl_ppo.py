"""TRL 0.19.1's PPOTrainer on the bench setting; runs INSIDE a separate TRL venv, never in minicai's.

    pip install torch==2.13.0 trl==0.19.1 transformers==4.53.3 datasets accelerate   # its own venv
    /path/to/trlvenv/bin/python bench/trl_ppo.py --policy P --reward-model R --prompts prompts.json \
        --iterations 3 [--bf16] [--threads N] [--out-jsonl times.jsonl]

bench/bench_ppo.py --trl-python PATH writes the inputs and runs this as a subprocess; it does not
import minicai (the project never imports TRL, and this script never imports the project).

Inputs:
  --policy        an HF causal-LM folder (minicai's save_hf of the embedded SmolLM2-135M-Instruct);
                  it is loaded twice: the trained policy and the frozen reference (ref_policy)
  --reward-model  an HF LlamaForSequenceClassification folder (num_labels 1, score.weight (1, C));
                  loaded twice: the frozen reward model and the trainable value model (TRL's setup)
  --prompts       JSON {"input_ids": [[...], ...], "stop_token_id": int}: the prompts already rendered
                  with the chat template by minicai's tokenizer, so both sides read the same ids

Settings (the bench's, matched to train_ppo.py): batch 8 = per_device_train_batch_size, 1 minibatch,
no gradient accumulation, 4 PPO epochs, response_length 64, temperature 0.7, kl_coef 0.05 (k1),
missing_eos_penalty 1.0, stop_token_id = the end-of-turn id, lr 1e-5 constant, Adam eps 1e-5,
vf_coef 0.1, clip 0.2 / 0.2, gamma 1, lam 0.95; no eval, no sample generations, no saving, CPU.
--bf16 sets TrainingArguments(bf16=True): accelerate's mixed precision (autocast around the prepared
model's forward; weights stay fp32). The script prints which precision accelerate reports.

Pad token: minicai's tokenizer pads with <|im_end|>, which is also the end-of-turn token inside
every prompt. TRL derives attention masks as `ids != pad_token_id`, which would mask the prompts'
<|im_end|> tokens, so here the pad token is <|endoftext|> (id 0, never in a prompt); the vocabulary
and the weights are unchanged.

Timing, without patching TRL's files: PPOTrainer.train() calls the module-level functions
batch_generation (the rollout) and get_reward (value model, then reward model) of
trl.trainer.ppo_trainer; this script rebinds those names to timing wrappers and adds a
TrainerCallback. Per iteration (one `update` of train()'s loop, ended by on_step_end):
  rollout           batch_generation
  score/ref/values  the rest up to the end of the last get_reward (ref forward, value model, reward model)
  update            after that up to on_step_end: missing-EOS penalty, rewards, GAE, whitening,
                    4 epochs of forward/backward/Adam, metrics
  iteration         from the previous on_step_end (the first: on_train_begin) to this on_step_end
One JSON line per iteration goes to stdout (prefixed "TRL_BENCH ") and to --out-jsonl.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True, help="HF causal-LM folder (policy and reference)")
    ap.add_argument("--reward-model", required=True, help="HF LlamaForSequenceClassification folder (reward, value)")
    ap.add_argument("--prompts", required=True, help='JSON {"input_ids": [[...]], "stop_token_id": int}')
    ap.add_argument("--iterations", type=int, default=3, help="PPO iterations (total_episodes = batch * iterations)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per iteration (per_device_train_batch_size)")
    ap.add_argument("--response-length", type=int, default=64, help="max new tokens")
    ap.add_argument("--ppo-epochs", type=int, default=4, help="num_ppo_epochs")
    ap.add_argument("--lr", type=float, default=1e-5, help="learning rate (constant)")
    ap.add_argument("--no-eos-penalty", type=float, default=1.0, help="missing_eos_penalty")
    ap.add_argument("--bf16", action="store_true", help="TrainingArguments bf16=True (accelerate mixed precision)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="seed")
    ap.add_argument("--out-jsonl", default=None, help="also write the per-iteration JSON lines here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    import trl
    import trl.trainer.ppo_trainer as ppo_mod
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import PPOConfig, PPOTrainer

    spec = json.load(open(args.prompts))
    prompts, stop_id = spec["input_ids"], int(spec["stop_token_id"])
    if len(prompts) != args.batch_size:
        raise SystemExit(f"{args.prompts}: {len(prompts)} prompts, expected --batch-size {args.batch_size}")

    tok = AutoTokenizer.from_pretrained(args.policy)
    tok.padding_side = "left"
    tok.pad_token = "<|endoftext|>"  # not <|im_end|>: see the module docstring
    assert tok.pad_token_id != stop_id and all(tok.pad_token_id not in p for p in prompts)
    f32 = torch.float32
    policy = AutoModelForCausalLM.from_pretrained(args.policy, torch_dtype=f32)
    ref = AutoModelForCausalLM.from_pretrained(args.policy, torch_dtype=f32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1, torch_dtype=f32)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1, torch_dtype=f32)
    policy.generation_config.pad_token_id = tok.pad_token_id  # finished rows are padded with it
    for m in (policy, ref, reward, value):
        m.config.pad_token_id = tok.pad_token_id

    data = Dataset.from_dict({"input_ids": prompts})
    out_dir = tempfile.mkdtemp(prefix="trl_ppo_bench_")  # TrainingArguments needs one; nothing is saved
    cfg = PPOConfig(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=args.ppo_epochs, response_length=args.response_length,
        temperature=0.7, kl_coef=0.05, kl_estimator="k1", stop_token_id=stop_id,
        missing_eos_penalty=args.no_eos_penalty, learning_rate=args.lr, lr_scheduler_type="constant",
        adam_epsilon=1e-5, weight_decay=0.0, vf_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
        whiten_rewards=False, total_episodes=args.batch_size * args.iterations, local_rollout_forward_batch_size=64,
        num_sample_generations=0, eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1,
        disable_tqdm=True, use_cpu=True, bf16=args.bf16, seed=args.seed, dataloader_num_workers=0)

    # ---- timing wrappers around the functions train() calls (module globals of trl.trainer.ppo_trainer)
    clock = {"rollout": 0.0, "last_reward_end": None, "resp_len": [], "gen_cols": 0, "eos": []}
    batch_generation, get_reward = ppo_mod.batch_generation, ppo_mod.get_reward

    def timed_generation(model, queries, *a, **k):
        t = time.perf_counter()
        out = batch_generation(model, queries, *a, **k)
        clock["rollout"] += time.perf_counter() - t
        clock["gen_cols"] = out[0].shape[1] - queries.shape[1]  # decode steps that ran
        return out

    def timed_reward(model, query_responses, pad_token_id, context_length):
        out = get_reward(model, query_responses, pad_token_id, context_length)
        clock["last_reward_end"] = time.perf_counter()
        if model is trainer.reward_model:  # the postprocessed (truncated) responses
            resp = query_responses[:, context_length:]
            clock["resp_len"] = (resp != pad_token_id).sum(1).float().tolist()
            clock["eos"] = (resp == stop_id).any(1).float().tolist()
        return out

    ppo_mod.batch_generation, ppo_mod.get_reward = timed_generation, timed_reward
    sink = open(args.out_jsonl, "w") if args.out_jsonl else None

    def emit(row):
        line = json.dumps(row)
        print("TRL_BENCH " + line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock["t_prev"] = time.perf_counter()
            acc = trainer.accelerator
            emit({"header": True, "trl": trl.__version__, "transformers": transformers.__version__,
                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "mixed_precision": str(acc.mixed_precision), "native_amp": bool(getattr(acc, "native_amp", False)),
                  "param_dtype": str(next(policy.parameters()).dtype), "pad_token_id": tok.pad_token_id,
                  "stop_token_id": stop_id, "prompt_tokens": [len(p) for p in prompts]})

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            it = now - clock["t_prev"]
            upd = now - clock["last_reward_end"]
            lens = clock["resp_len"]
            emit({"step": state.global_step, "time/rollout": clock["rollout"],
                  "time/score_ref_values": it - clock["rollout"] - upd, "time/update": upd, "time/iteration": it,
                  "response/length": sum(lens) / len(lens), "response/eos_fraction": sum(clock["eos"]) / len(lens),
                  "generated_columns": clock["gen_cols"]})
            clock["t_prev"], clock["rollout"] = time.perf_counter(), 0.0

    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=data, value_model=value, eval_dataset=data, callbacks=[Timer()])
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    if sink:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
