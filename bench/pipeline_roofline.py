"""Stage-time roofline of a finished pipeline run: where the run's seconds went, and what share of
the machine's measured GEMM peak or read bandwidth each stage and sub-phase reached.

    python bench/pipeline_roofline.py RUN [--no-measure]

RUN is a finished `python -m minicai.experiments.pipeline --out RUN` folder. The script reads only the
run's own files (RUN/pipeline.json for each stage's seconds and command; each stage's config.json,
summaries, metrics and texts), prints a table, and writes RUN/roofline.md and RUN/roofline.json
(atomically). Unless --no-measure, it first measures the machine's peaks in this same process:

  * GEMM peak: the best of 5 square 2048^3 matmuls (2 * 2048^3 FLOPs each), in fp32 and in bf16
    (bench/bench_train.py gemm_peak, mirrored here with a device argument);
  * read bandwidth: the best of 5 matrix-vector products over a 512 MiB fp32 matrix, bytes of the
    matrix / seconds (bench/bench_generate.py read_bandwidth_gbs, mirrored).
With --no-measure every % column says "not measured". The peaks are taken on CUDA when the run's
--device is cuda or auto and CUDA is present, else on the CPU (where the pipeline ran).

Rows: one per stage sub-phase where the run's files give its seconds, then one "(stage total)" row
with the stage's wall seconds from pipeline.json (loading, saving and anything unsplit included):
  round1/sl   generate  = sft_summary.json generation_seconds_this_run (the critique -> revision traces)
              SFT       = wall_seconds_this_run - generation_seconds_this_run (training + held-out loss)
  round1/rm   sample    = summary.json seconds.feedback_generate_s  (the SL policy's k responses per prompt)
              judge     = seconds.feedback_judge_s  (the feedback ensemble labels every pair)
              RM train  = seconds.reward_model_s    (training + per-epoch and final evaluation)
              normalise = seconds.normalise_s       (scoring every distinct sequence once)
  round1/ppo  rollout / score+ref+values / update = sums over metrics.jsonl of time/rollout,
              time/score_ref_values, time/update
  dpo         the stage seconds only (train_dpo.py writes no split): reference pass + training + evaluation
  eval        generate <policy> = eval.json seconds.generate_<p> - seconds.judge_free_<p> (the first
              includes the second); judge-free <policy> = seconds.judge_free_<p>; reward model =
              seconds.reward_model
The baseline (train_sl.py --traces: SFT only), self-improvement rounds (roundK/*) and eval_round*
are read the same way; a stage of any other script gets a stage-total row with "n/a" work.

Columns and formulas:
  seconds     as above.
  model       the model(s) doing the work; N = parameters in matrix products, counted from the model
              config (no weights are loaded): per block q (d x H*hd), k and v (d x K*hd each), o
              (H*hd x d), gate, up, down (3 x d x F); plus the LM head (d x V), which is counted as a
              matrix product wherever logits are computed, whether it is tied to the embedding or not
              (SmolLM2-135M and Qwen2.5-Coder-1.5B tie it: their parameter count holds it once, as the
              embedding, and FLOPs count it as the head). Embedding lookups, norms, biases, RoPE and
              attention's own score/value products (QK^T, AV; a few % at these lengths) are left out.
              "body" = N without the LM head (reward and value scores, the A/B judge: its head reads 2
              logits at one position).
  dtype       the stage's compute dtype, read from its command: --bf16 (autocast), --gen-dtype,
              --dtype, --feedback-dtype (train_rm.py's judges; 'fast' resolved on this machine),
              evaluate --dtype. It picks the fp32 or the bf16 peak.
  prefill     tokens run forward without being sampled (prompts before decoding, scored or labelled
              sequences, reference/value passes), summed over every model of the row.
  decoded     tokens sampled one step at a time: the run's stored texts tokenized with the model's
              own tokenizer (stripped texts: the stop token, and whitespace the scripts strip, are not
              counted, so it is slightly low), or, for PPO, response/length x batch per iteration.
  trained     tokens run forward AND backward (real tokens, padding excluded).
  GFLOP       model FLOPs of that work: 2 * N per forward or decoded token, 6 * N per trained token
              (N with or without the head as above; the head counted only at the positions whose
              logits are computed: every decoded token, the last prefill position per row, the
              response positions of PPO's log-probs, every position of SFT/DPO training).
  GFLOP/s     GFLOP / seconds.
  %peak       GFLOP/s / the measured GEMM peak of the row's dtype (bf16 or fp32); for a stage total
              with sub-phases of different dtypes (dtype "mixed"): sum over its sub-phases of GFLOP /
              that sub-phase's peak, over the stage's seconds (the share of the time the work would
              take at peak).
  GB/s, %bw   rows that decode (sub-phases only): weight bytes read per decode step x steps / seconds, and
              that over the measured read bandwidth. bytes per step = all matmul parameters (N with
              the head) x bytes per weight element (2 for bf16 weights, 4 for fp32 weights, also
              under --bf16 autocast, whose weights stay fp32); steps = decoded tokens / batch rows
              (an approximation: rows stop at different lengths and the last batch is smaller, so
              the true step count is somewhat larger).
  notes       what was approximated and what could not be counted ("n/a: reason"); a GFLOP figure
              marked ">=" leaves some work out (named in the note).
Everything that cannot be derived from the files is reported as n/a with the reason, never guessed.
A stage resumed after an interruption has seconds of its last invocation only (pipeline.json and the
"this_run" figures) but the whole stage's work: its GFLOP/s would be overstated; read such a run
with care.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minicai.errors import InputError
from minicai.io.files import atomic_write_json, atomic_write_text  # noqa: E402


# ------------------------------------------------------------------------------ peaks
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_peak(dtype, device: str = "cpu", n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matmul in `dtype` (bench/bench_train.py gemm_peak, on `device`)."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def read_bandwidth_gbs(device: str = "cpu", mib: int = 512, reps: int = 5) -> float:
    """Best-of-reps read bandwidth (GB/s): a matrix-vector product over a `mib` MiB fp32 matrix
    (bench/bench_generate.py read_bandwidth_gbs, on `device`)."""
    m = torch.ones(mib * 1024 * 1024 // 4 // 1024, 1024, device=device)
    v = torch.ones(1024, device=device)
    torch.mv(m, v)
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mv(m, v)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return m.numel() * m.element_size() / best / 1e9


def measure_peaks(device: str) -> dict:
    """Both peaks on `device`, with the load average seen just before (a busy machine measures low)."""
    return {"device": device, "load_average": [round(x, 2) for x in os.getloadavg()], "gemm_gflops": {"float32": gemm_peak(torch.float32, device),
                                              "bfloat16": gemm_peak(torch.bfloat16, device)},
            "read_gbs": read_bandwidth_gbs(device), "gemm": "best of 5 2048^3 matmuls",
            "bandwidth": "best of 5 matrix-vector products over a 512 MiB fp32 matrix"}


# ------------------------------------------------------------------------------ models (config only)
@dataclass
class ModelInfo:
    name: str
    body: int   # matmul parameters of the blocks
    head: int   # the LM head, d x V
    tok: object

    @property
    def full(self) -> int:
        return self.body + self.head


def matmul_params(cfg) -> tuple[int, int]:
    """(block matmul parameters, LM head parameters) of a ModelConfig (see the module docstring)."""
    hd = cfg.dim // cfg.n_heads
    per_layer = (cfg.dim * cfg.n_heads * hd + 2 * cfg.dim * cfg.n_kv_heads * hd + cfg.n_heads * hd * cfg.dim
                 + 3 * cfg.dim * cfg.hidden_dim)
    return cfg.n_layers * per_layer, cfg.dim * cfg.vocab_size


_MODELS: dict[str, ModelInfo | str] = {}


def model_info(spec: str) -> ModelInfo | str:
    """ModelInfo of a model spec (a .gguf, an HF folder or a name) from its config and tokenizer
    only, or a string saying why it cannot be read."""
    if spec in _MODELS:
        return _MODELS[spec]
    from minicai.io.checkpoint import config_from_gguf, config_from_hf, resolve_model
    from minicai.io.gguf import read_gguf_metadata
    from minicai.io.tokenizer import tokenizer_from_gguf, tokenizer_from_hf
    try:
        path = resolve_model(spec)
        if path.is_dir():
            cfg = config_from_hf(json.loads((path / "config.json").read_text()), path)
            tok = tokenizer_from_hf(path)
        else:
            meta = read_gguf_metadata(path)
            cfg, tok = config_from_gguf(meta, path), tokenizer_from_gguf(meta, str(path))
        body, head = matmul_params(cfg)
        label = "/".join(Path(spec).resolve().parts[-2:]) if Path(spec).exists() else spec
        info: ModelInfo | str = ModelInfo(label, body, head, tok)
    except (InputError, OSError, KeyError, ValueError) as e:
        info = f"model {spec} not readable here ({str(e).splitlines()[0][:120]})"
    _MODELS[spec] = info
    return info


def prompt_ids(tok, text: str) -> list[int]:
    return tok.render([{"role": "user", "content": text}], add_generation_prompt=True)[0]


def n_text(tok, text: str) -> int:
    return len(tok.encode(text)) if text else 0


# ------------------------------------------------------------------------------ rows
@dataclass
class Row:
    stage: str
    phase: str
    seconds: float | None
    dtype: str | None = None
    models: list[str] = field(default_factory=list)
    prefill: int = 0
    decoded: int = 0
    trained: int = 0
    flops: float = 0.0
    decode_rows: int | None = None
    decode_bytes_per_step: int | None = None
    lower_bound: bool = False
    work_na: str | None = None
    notes: list[str] = field(default_factory=list)
    parts: list[tuple[float, str | None]] | None = None  # a stage total: (FLOPs, dtype) of each sub-phase

    def use(self, mi: ModelInfo, what: str = "") -> None:
        label = f"{mi.name}{what} (N={mi.full / 1e6:.4g}M, body {mi.body / 1e6:.4g}M)"
        if label not in self.models and (what or not any(m.startswith(mi.name) for m in self.models)):
            self.models.append(label)

    def forward(self, mi: ModelInfo, tokens: int, head_tokens: int) -> None:
        """Forward-only work: 2 * (body * tokens + head * head_tokens)."""
        self.use(mi)
        self.prefill += tokens
        self.flops += 2 * (mi.body * tokens + mi.head * head_tokens)

    def decode(self, mi: ModelInfo, tokens: int, rows: int, weight_bytes: int) -> None:
        """Decoded tokens: 2 * N (head included) each; one step reads every matmul weight once."""
        self.use(mi)
        self.decoded += tokens
        self.flops += 2 * mi.full * tokens
        self.decode_rows = rows
        self.decode_bytes_per_step = mi.full * weight_bytes

    def train(self, mi: ModelInfo, tokens: int, head_tokens: int) -> None:
        """Forward + backward: 6 * (body * tokens + head * head_tokens)."""
        self.use(mi)
        self.trained += tokens
        self.flops += 6 * (mi.body * tokens + mi.head * head_tokens)

    def na(self, reason: str) -> None:
        self.work_na = reason if self.work_na is None else self.work_na + "; " + reason


def bytes_of(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else 4


def resolve_dtype(choice: str | None, device: str) -> str:
    """'auto' / 'fast' / explicit -> 'float32' or 'bfloat16' as the scripts resolve them (on this machine)."""
    from minicai.infra.devices import bf16_is_fast
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if choice in (None, "auto"):
        return "bfloat16" if cuda else "float32"
    if choice == "fast":
        return "bfloat16" if bf16_is_fast() else "float32"
    return choice


def flag(cmd: list[str], name: str, default=None):
    """The value after `name` in a command line (the last one), True for a bare flag, else default."""
    val = default
    for i, t in enumerate(cmd):
        if t == name:
            val = cmd[i + 1] if i + 1 < len(cmd) and not cmd[i + 1].startswith("--") else True
    return val


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_json(path: Path) -> dict:
    if not path.exists():
        raise InputError(f"{path}: missing (is the run finished?)")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------ round1/sl
def sl_rows(name: str, folder: Path, cmd: list[str], device: str) -> list[Row]:
    import train_sl
    from minicai.infra import distributed

    cfg, summ = read_json(folder / "config.json"), read_json(folder / "sft_summary.json")
    gen_dtype = resolve_dtype(flag(cmd, "--gen-dtype", cfg.get("gen_dtype", "float32")), device)
    train_dtype = "bfloat16" if flag(cmd, "--bf16", cfg.get("bf16")) is True else "float32"
    gen_s = summ.get("generation_seconds_this_run")
    gen = Row(name, "generate (critique -> revision)", gen_s, gen_dtype)
    sft = Row(name, "SFT", None if gen_s is None else summ["wall_seconds_this_run"] - gen_s, train_dtype)
    mi = model_info(cfg["model"])
    critic = model_info(cfg["critic_model"]) if cfg.get("critic_model") else mi
    trace_path = Path(cfg["traces"]) if cfg.get("traces") else folder / "traces.jsonl"  # the baseline: SL-CAI's
    traces = read_jsonl(trace_path)
    if isinstance(mi, str) or isinstance(critic, str):
        for r in (gen, sft):
            r.na(mi if isinstance(mi, str) else critic)
        return [gen, sft]
    if cfg.get("traces"):
        gen.na("traces read from another run (--traces): nothing generated here")
    else:
        init = sum(n_text(mi.tok, t["initial"]) for t in traces)
        crit = sum(n_text(critic.tok, r.get("critique", "")) + n_text(critic.tok, r.get("revision", ""))
                   for t in traces for r in t["rounds"])
        rows = min(cfg.get("gen_batch_size", 8), max(1, len(traces)))
        gen.decode(mi, init, rows, bytes_of(gen_dtype))
        if crit:
            gen.decode(critic, crit, rows, bytes_of(gen_dtype))
        gen.lower_bound = True
        gen.notes.append(f"decoded = initial responses {init} + critiques/revisions {crit} tokens of traces.jsonl; "
                         f"prefill n/a: the critique/revision contexts are built inside slcai.traces and not stored; "
                         f"rows = --gen-batch-size {rows}")
        if summ.get("prompts") and summ["prompts"] != len(traces):
            gen.notes.append(f"{summ['prompts']} prompts in the summary, {len(traces)} traces")
    # SFT: the exact examples and batch plan of train_sl.run_sft
    args = argparse.Namespace(target=cfg.get("target", "revision"), val_fraction=cfg.get("val_fraction", 0.1),
                              max_len=cfg.get("max_len", 512))
    if cfg.get("traces"):  # --traces: only the selected prompts' records (train_sl.read_traces)
        from minicai.infra import cli
        traces = train_sl.read_traces(trace_path, train_sl.select_prompts(cli.parse(train_sl.Args, cmd[1:])))
    train, val = train_sl.sft_data(traces, mi.tok, args, trace_path)
    steps, accum, bs = summ["steps"], cfg.get("grad_accum", 1), cfg.get("batch_size", 4)
    batches = train_sl.micro_batches(train, bs, cfg.get("seed", 0), distributed.Dist())
    plan = [next(batches)[0] for _ in range(steps * accum)]
    real = sum(len(train[i][0]) for b in plan for i in b)
    padded = sum(len(b) * max(len(train[i][0]) for i in b) for b in plan)
    sft.train(mi, real, real)
    n_evals = sum("val_loss" in r for r in read_jsonl(folder / "sft_metrics.jsonl")) + (1 if val else 0)
    val_tok = sum(len(x[0]) for x in val)
    sft.forward(mi, n_evals * val_tok, n_evals * val_tok)
    sft.notes.append(f"{steps} steps x {accum} micro-batches of {bs}: {real} real tokens ({padded} with padding); "
                     f"held-out loss {n_evals}x over {val_tok} tokens; seconds include loading and saving")
    return [gen, sft]


# ------------------------------------------------------------------------------ round1/rm
def rm_rows(name: str, folder: Path, cmd: list[str], device: str) -> list[Row]:
    import train_rm
    from minicai.feedback import judge_context, member_methods, option_tokens, scorers_of, shared_prefix_groups
    from minicai.io.constitution_files import load_constitution
    from minicai.io.data import split_pairs
    from minicai.io.files import read_preferences
    from minicai.infra.labelling import DEFAULT, member_spec

    cfg, summ = read_json(folder / "config.json"), read_json(folder / "summary.json")
    sec = summ.get("seconds", {})
    pol_dtype = resolve_dtype(flag(cmd, "--dtype", cfg.get("dtype", "auto")), device)
    fb_dtype = resolve_dtype(flag(cmd, "--feedback-dtype", cfg.get("feedback_dtype", "fast")), device)
    train_dtype = "bfloat16" if flag(cmd, "--bf16", cfg.get("bf16")) is True else "float32"
    sample = Row(name, "sample responses", sec.get("feedback_generate_s"), pol_dtype)
    judge = Row(name, "judge (label pairs)", sec.get("feedback_judge_s"), fb_dtype)
    trn = Row(name, "RM train (+ evaluation)", sec.get("reward_model_s"), train_dtype)
    norm = Row(name, "normalise", sec.get("normalise_s"), train_dtype)
    rows = [sample, judge, trn, norm]
    pref = Path(cfg["preferences"]) if cfg.get("preferences") else folder / "preferences.jsonl"
    recs = read_jsonl(pref)
    dropped = read_jsonl(pref.with_name(pref.stem + ".dropped" + pref.suffix))
    pol = model_info(cfg["policy"])
    rm_init = model_info(cfg.get("rm_init") or cfg["policy"])
    if isinstance(pol, str):
        for r in rows:
            r.na(pol)
        return rows
    if cfg.get("preferences") or cfg.get("labeller") in ("revision", "rlcd"):
        why = "--preferences given: nothing sampled or labelled" if cfg.get("preferences") else \
            f"--labeller {cfg['labeller']}: not counted by this script"
        sample.na(why)
        judge.na(why)
    else:
        # 1. sampling: k responses per prompt, one prefill per prompt (generate copies the cache to the k rows)
        k = cfg.get("k", 2)
        resp, prompts = {}, {}
        for r in recs:
            pid, (i, j) = r["prompt_id"], r["key"].split(":")[-1].split("-")
            resp[(pid, i)], resp[(pid, j)], prompts[pid] = r["response_a"], r["response_b"], r["prompt"]
        for r in dropped:
            pid, (i, j) = r["prompt_id"], r["key"].split(":")[-1].split("-")
            resp[(pid, i)], resp[(pid, j)], prompts[pid] = r["response"], r["response"], r["prompt"]
        pre = sum(len(prompt_ids(pol.tok, p)) for p in prompts.values())
        sample.forward(pol, pre, len(prompts))
        rows_b = min(cfg.get("gen_batch_size", 8), len(prompts)) * k
        sample.decode(pol, sum(n_text(pol.tok, t) for t in resp.values()), rows_b, bytes_of(pol_dtype))
        sample.notes.append(f"{len(prompts)} prompts x k={k} responses ({len(resp)} distinct (prompt, sample) texts "
                            f"in preferences + dropped); rows = --gen-batch-size x k = {rows_b}")
        # 2. judging: the exact contexts of feedback.judge_pairs / contrast_pairs, per labelling batch
        principles = {q.comparison: q for q in load_constitution(cfg.get("constitution", "default"),
                                                                 cfg.get("comparisons")).principles}
        scorers = scorers_of(cfg.get("labeller", "ab"))
        members = []
        for n in cfg.get("feedback_model") or DEFAULT["feedback_models"]:
            spec, methods = member_spec(n)
            spec = cfg["policy"] if spec == "policy" else spec
            members.append((spec, member_methods((n, None, None, methods), scorers)))
        order = list(dict.fromkeys(r["prompt_id"] for r in recs))
        gb, jb = cfg.get("gen_batch_size", 8), cfg.get("judge_batch_size", 8)
        chunks = [set(order[s:s + gb]) for s in range(0, len(order), gb)]
        batches = [[r for r in recs if r["prompt_id"] in c] for c in chunks]
        full_tokens = ab_run = 0
        for spec, methods in members:
            mi = model_info(spec)
            if isinstance(mi, str):
                judge.na(mi)
                judge.lower_bound = True
                continue
            for meth in methods:
                judge.use(mi, f":{meth}")
                for batch in batches:
                    if meth == "ab":
                        prefix = option_tokens(mi.tok)[0]
                        ctx = []
                        for r in batch:
                            conv = f"Human: {r['prompt']}"
                            for comp in r["principles"]:
                                ctx.append(tuple(judge_context(mi.tok, conv, comp, r["response_a"], r["response_b"]) + prefix))
                                ctx.append(tuple(judge_context(mi.tok, conv, comp, r["response_b"], r["response_a"]) + prefix))
                        uniq = list(dict.fromkeys(ctx))
                        full_tokens += sum(len(c) for c in uniq)
                        run = sum(sum(len(uniq[i]) for i in m) - (len(m) - 1) * P if P else len(uniq[m[0]])
                                  for P, m in shared_prefix_groups(uniq, jb))
                        judge.forward(mi, run, 0)
                        ab_run += run
                    elif meth == "contrast":
                        items = set()
                        for r in batch:
                            user = r["prompt"]
                            for comp in r["principles"]:
                                if comp not in principles:
                                    judge.na(f"principle not in constitution {cfg.get('constitution')}")
                                    continue
                                follow, violate = principles[comp].contrast()
                                for sysp in (follow, violate):
                                    items |= {(sysp, user, r["response_a"]), (sysp, user, r["response_b"])}
                        tok_n = head_n = 0
                        for sysp, user, reply in items:
                            full, mask = mi.tok.render([{"role": "system", "content": sysp},
                                                        {"role": "user", "content": user},
                                                        {"role": "assistant", "content": reply}])
                            tok_n, head_n = tok_n + len(full), head_n + max(1, sum(mask) - 1)
                        judge.forward(mi, tok_n, head_n)
        judge.notes.append(f"A/B contexts: both orders x {cfg.get('principles_per_pair', 2)} principles per pair, "
                           f"{ab_run} tokens run after shared-prefix grouping (feedback.shared_prefix_groups; "
                           f"{full_tokens} without it), head at 2 logits of one position (not counted); the prefill "
                           f"column adds the contrast member's tokens; contrast: "
                           f"4 sequences per principle (deduplicated per batch), fp32 head on reply tokens; the "
                           f"labelling batches are re-cut from the file's prompt order (prefix sharing may differ "
                           f"slightly)")
    # 3. reward model: train_rm's own tokenization and split; trunk + scalar head (body only)
    if isinstance(rm_init, str):
        trn.na(rm_init)
        norm.na(rm_init)
        return rows
    records = read_preferences(pref)
    pairs, skipped = train_rm.tokenize_pairs(records, rm_init.tok, cfg.get("max_len", 1024))
    train, val = split_pairs(pairs, cfg.get("pair_val_fraction", 0.2))
    ep = cfg.get("epochs", 2)
    tt = sum(len(x["a"]) + len(x["b"]) for x in train)
    vt = sum(len(x["a"]) + len(x["b"]) for x in val)
    trn.train(rm_init, ep * tt, 0)
    trn.forward(rm_init, tt + vt * (ep + 1 if val else 0), 0)
    trn.notes.append(f"{len(train)} training pairs x {ep} epochs ({tt} tokens/epoch, both sides); held-out pairs "
                     f"scored each epoch and at the end, training pairs once at the end; body only (scalar head)")
    seqs = {tuple(s) for x in pairs for s in (x["a"], x["b"])}
    norm.forward(rm_init, sum(len(s) for s in seqs), 0)
    norm.notes.append(f"{len(seqs)} distinct sequences scored once")
    return rows


# ------------------------------------------------------------------------------ round1/ppo
def ppo_rows(name: str, folder: Path, cmd: list[str], device: str) -> list[Row]:
    from minicai.infra.ppo import prompt_batch, train_prompts

    cfg, metrics = read_json(folder / "config.json"), read_jsonl(folder / "metrics.jsonl")
    dtype = "bfloat16" if flag(cmd, "--bf16", cfg.get("bf16")) is True else "float32"
    roll = Row(name, "rollout", sum(m["time/rollout"] for m in metrics), dtype)
    srv = Row(name, "score + ref + values", sum(m["time/score_ref_values"] for m in metrics), dtype)
    upd = Row(name, "update", sum(m["time/update"] for m in metrics), dtype)
    rows = [roll, srv, upd]
    pol, rm = model_info(cfg["policy"]), model_info(cfg["reward_model"])
    ref = model_info(cfg["ref"]) if cfg.get("ref") else pol
    bad = [x for x in (pol, rm, ref) if isinstance(x, str)]
    if bad:
        for r in rows:
            r.na(bad[0])
        return rows
    B, k, epochs = cfg["batch_size"], cfg.get("k") or 1, cfg.get("ppo_epochs", 4)
    prompts = train_prompts(cfg.get("prompts"), cfg.get("held_out_fraction", 0.2))
    ids = [prompt_ids(pol.tok, p.text) for p in prompts]
    P = R = 0
    for m in metrics:
        it = m["step"] - 1
        P += sum(len(ids[i]) for i in prompt_batch(len(prompts), B // k, it, cfg.get("seed", 0)) for _ in range(k))
        R += round(m["response/length"] * B)
    roll.forward(pol, P, len(metrics) * B)
    roll.decode(pol, R, B, bytes_of("float32"))
    roll.notes.append(f"{len(metrics)} iterations x {B} rows; prompts re-drawn with infra.ppo.prompt_batch; decoded = "
                      f"response/length x batch per iteration; fp32 weights (autocast under --bf16)")
    srv.forward(pol, P + R, R)
    srv.forward(ref, P + R, R)
    srv.forward(rm, P + R, 0)
    srv.notes.append("policy log-probs and values (one forward, head on response positions), reference log-probs, "
                     "reward model (body) on prompt + response")
    if cfg.get("value_model") not in (None, "shared", "none"):
        srv.na(f"value model {cfg['value_model']!r}: its passes are not counted")
        upd.na(f"value model {cfg['value_model']!r}: its training is not counted")
        srv.lower_bound = upd.lower_bound = True
    upd.train(pol, epochs * (P + R), epochs * R)
    upd.notes.append(f"--ppo-epochs {epochs} passes over prompt + response, head on response positions")
    return rows


# ------------------------------------------------------------------------------ dpo
def dpo_rows(name: str, folder: Path, cmd: list[str], device: str, seconds: float) -> list[Row]:
    import train_dpo
    from minicai.io.data import split_pairs
    from minicai.io.files import read_preferences

    cfg, summ = read_json(folder / "config.json"), read_json(folder / "dpo_summary.json")
    dtype = "bfloat16" if flag(cmd, "--bf16", cfg.get("bf16")) is True else "float32"
    row = Row(name, "reference + training + evaluation", seconds, dtype)
    pol = model_info(cfg["policy"])
    ref = model_info(cfg["ref"]) if cfg.get("ref") else pol
    if isinstance(pol, str) or isinstance(ref, str):
        row.na(pol if isinstance(pol, str) else ref)
        return [row]
    args = argparse.Namespace(labels=cfg.get("labels", "soft"), label_smoothing=cfg.get("label_smoothing", 0.0),
                              max_len=cfg.get("max_len", 1024), preferences=cfg["preferences"])
    pairs, _ = train_dpo.make_pairs(read_preferences(Path(cfg["preferences"])), pol.tok, args)
    train, val = split_pairs(pairs, cfg.get("pair_val_fraction", 0.2))
    tok = lambda ps: sum(len(x["ta"][0]) + len(x["tb"][0]) for x in ps)  # noqa: E731
    ep = cfg.get("epochs", 2)
    row.forward(ref, tok(pairs), tok(pairs))
    row.train(pol, ep * tok(train), ep * tok(train))
    n_val = sum(any(k.startswith("val") for k in r) for r in read_jsonl(folder / "dpo_metrics.jsonl"))
    row.forward(pol, n_val * tok(val) + tok(train) + tok(val), n_val * tok(val) + tok(train) + tok(val))
    row.notes.append(f"reference log-probs once over {len(pairs)} pairs; {len(train)} pairs x {ep} epochs trained "
                     f"({summ.get('steps')} steps); held-out scored {n_val}x plus final train + held-out; no "
                     f"sub-phase seconds in the files: one row for the stage")
    return [row]


# ------------------------------------------------------------------------------ eval
def eval_rows(name: str, folder: Path, cmd: list[str], device: str) -> list[Row]:
    from minicai.feedback import reward_input, user_turn
    from minicai.eval.hhh import load_hhh

    res = read_json(folder / "eval.json")
    sec, cfg = res.get("seconds", {}), res.get("config", {})
    dtype = resolve_dtype(flag(cmd, "--dtype", cfg.get("dtype", "float32")), device)
    bs = int(flag(cmd, "--batch-size", 8))
    pols = dict(p.split("=", 1) for p in _after(cmd, "--policies"))
    samples, jf = res.get("samples") or [], res.get("judge_free") or {}
    rows = []
    for p, spec in pols.items():
        mi = model_info(spec)
        g = Row(name, f"generate {p}", _sub(sec.get(f"generate_{p}"), sec.get(f"judge_free_{p}")), dtype)
        rows.append(g)
        free = Row(name, f"judge-free {p}", sec.get(f"judge_free_{p}"), dtype) if f"judge_free_{p}" in sec else None
        if isinstance(mi, str):
            g.na(mi)
            if free:
                free.na(mi)
                rows.append(free)
            continue
        texts = [(s["prompt"], s["responses"].get(p, "")) for s in samples]
        g.forward(mi, sum(len(prompt_ids(mi.tok, q)) for q, _ in texts), len(texts))
        g.decode(mi, sum(n_text(mi.tok, t) for _, t in texts), min(bs, max(1, len(texts))), bytes_of(dtype))
        g.notes.append(f"{len(texts)} held-out prompts (eval.json samples), greedy; rows = --batch-size; seconds include loading the policy")
        if free:
            sets = [(s["prompt"], s["responses"].get(p, "")) for key in ("harmful", "benign") for s in jf.get(key, [])]
            free.forward(mi, sum(len(prompt_ids(mi.tok, q)) for q, _ in sets), len(sets))
            free.decode(mi, sum(n_text(mi.tok, t) for _, t in sets), min(max(bs, 16), max(1, len(sets))),
                        bytes_of(dtype))
            ref_tok = (jf.get("sets") or {}).get("reference_tokens") or 0
            free.forward(mi, ref_tok, ref_tok)
            free.lower_bound = True
            free.notes.append(f"{len(sets)} harmful + benign prompts and replies of eval.json, rows = max(batch, 16); "
                              f"perplexity text {ref_tok} tokens once; n/a: the capability and BIG-bench cloze items "
                              f"are not stored in the run")
            rows.append(free)
    if "reward_model" in sec:
        r = Row(name, "reward model", sec["reward_model"], dtype)
        rm = model_info(flag(cmd, "--reward-model", cfg.get("reward_model")))
        if isinstance(rm, str):
            r.na(rm)
        else:
            n = sum(len(reward_input(rm.tok, s["prompt"], s["responses"][p])) for s in samples for p in pols
                    if p in s["responses"])
            r.forward(rm, n, 0)
            counted, missing = [], []
            for check, acc in (res.get("reward_model_accuracy") or {}).items():
                spec = {"builtin_pairs": "builtin", "bigbench_hhh": "bigbench"}.get(check)
                try:
                    items = load_hhh(spec, cfg.get("bigbench"))[0] if spec else None
                except (InputError, OSError) as e:
                    items, why = None, str(e).splitlines()[0][:80]
                else:
                    why = "unknown check"
                n_items = (acc.get("accuracy") or {}).get("n")
                if items is None or (n_items is not None and n_items != len(items)):
                    missing.append(f"{check} ({why if items is None else 'item count differs from the run'})")
                    continue
                r.forward(rm, sum(len(reward_input(rm.tok, user_turn(c), x)) for c, b, w in items for x in (b, w)), 0)
                counted.append(f"{check} ({len(items)} pairs, both replies)")
            r.lower_bound = bool(missing)
            r.notes.append("every policy's held-out samples scored (body only)" +
                           (f"; labelled-pair checks {', '.join(counted)}" if counted else "") +
                           (f"; n/a: {', '.join(missing)}" if missing else ""))
        rows.append(r)
    for key in sec:
        if key == "judge":
            r = Row(name, "AI judge", sec[key], dtype)
            r.na("judge prompts are not reconstructed by this script")
            rows.append(r)
    return rows


def _after(cmd: list[str], name: str) -> list[str]:
    if name not in cmd:
        return []
    out = []
    for t in cmd[cmd.index(name) + 1:]:
        if t.startswith("--"):
            break
        out.append(t)
    return out


def _sub(a, b):
    return None if a is None else a - (b or 0)


# ------------------------------------------------------------------------------ the table
STAGE_KIND = {"sl": sl_rows, "rm": rm_rows, "ppo": ppo_rows}


def stage_order(name: str) -> tuple:
    """The pipeline's run order: round1's sl, baseline, rm, ppo, then dpo, later rounds with their
    eval_round*, the final eval last."""
    rnd = 1
    if name.startswith("round"):
        rnd = int(name.split("/")[0][5:] or 1)
    elif name.startswith("eval_round"):
        rnd = int(name[10:] or 1)
    step = {"sl": 0, "baseline": 1, "rm": 2, "ppo": 3, "dpo": 4}
    if name == "eval":
        return (10 ** 6, 0)
    if name.startswith("eval_round"):  # eval_round1 runs after dpo, before round 2; eval_roundK after roundK
        return (2, -1) if rnd == 1 else (rnd, 9)
    return (rnd, step.get(name.split("/")[-1], 5))


def stage_rows(run: Path, log: dict, device: str) -> list[Row]:
    rows = []
    for name, st in sorted(log.get("stages", {}).items(), key=lambda kv: stage_order(kv[0])):
        cmd = shlex.split(st["command"])[1:]  # drop "python"
        out = Path(flag(cmd, "--out", ""))
        # "-m train_sl ..." (since the wheel issue) or "train_sl.py ..." (runs recorded before it)
        script = (cmd[1] if cmd[0] == "-m" else Path(cmd[0]).name).removesuffix(".py")
        try:
            if script == "train_sl":
                sub = sl_rows(name, out, cmd, device)
            elif script == "train_rm":
                sub = rm_rows(name, out, cmd, device)
            elif script == "train_ppo":
                sub = ppo_rows(name, out, cmd, device)
            elif script == "train_dpo":
                sub = dpo_rows(name, out, cmd, device, st["seconds"])
            elif script in ("minicai.eval.evaluate", "minicai.evaluate"):
                sub = eval_rows(name, out, cmd, device)
            else:
                sub = []
        except Exception as e:  # noqa: BLE001 - one unreadable stage must not hide the others' rows
            r = Row(name, "(sub-phases)", None)
            r.na(f"{'' if isinstance(e, InputError) else type(e).__name__ + ': '}{str(e).splitlines()[0][:160]}")
            sub = [r]
        total = Row(name, "(stage total)", st["seconds"], sub[0].dtype if sub else None)
        for r in sub:
            total.prefill, total.decoded, total.trained = (total.prefill + r.prefill, total.decoded + r.decoded,
                                                           total.trained + r.trained)
            total.flops += r.flops
            total.lower_bound |= r.lower_bound or r.work_na is not None
            total.models += [m for m in r.models if m not in total.models]
        if not sub:
            total.na(f"stage '{name}' ({script}) is not broken down by this script")
        else:
            known = sum(r.seconds or 0 for r in sub)
            total.notes.append(f"wall seconds from pipeline.json; {st['seconds'] - known:.1f} s outside the "
                               f"sub-phases (loading, saving, unsplit work)")
            total.parts = [(r.flops, r.dtype) for r in sub]
            if len({r.dtype for r in sub}) > 1:
                total.dtype = "mixed"
                total.notes.append("mixed dtypes: %peak = sum over sub-phases of GFLOP / its dtype's peak, "
                                   "over the stage seconds")
        rows += sub + [total]
    return rows


def cells(r: Row, peaks: dict | None) -> dict:
    """The table's values of one row (None = not applicable)."""
    d = {"stage": r.stage, "phase": r.phase, "seconds": r.seconds, "model": "; ".join(r.models) or None,
         "dtype": r.dtype, "prefill_tokens": r.prefill, "decoded_tokens": r.decoded, "trained_tokens": r.trained,
         "gflop": r.flops / 1e9, "gflop_lower_bound": r.lower_bound, "gflops": None, "pct_peak": None,
         "decode_rows": r.decode_rows, "decode_steps": None, "weight_bytes_per_step": r.decode_bytes_per_step,
         "gbs": None, "pct_bandwidth": None, "work_na": r.work_na, "notes": r.notes}
    if r.work_na and not r.flops:
        for k in ("prefill_tokens", "decoded_tokens", "trained_tokens", "gflop"):
            d[k] = None
    if r.seconds and r.flops:
        d["gflops"] = r.flops / 1e9 / r.seconds
        if peaks:
            peak = lambda dt: peaks["gemm_gflops"]["bfloat16" if dt == "bfloat16" else "float32"] * 1e9  # noqa: E731
            d["pct_peak"] = 100 * sum(f / peak(dt) for f, dt in (r.parts or [(r.flops, r.dtype)])) / r.seconds
    # the bandwidth view: every sub-phase that decodes (sampling is bound by reading the weights per step)
    if r.decoded and r.decode_rows and r.seconds and r.phase != "(stage total)":
        steps = r.decoded / r.decode_rows
        d["decode_steps"] = steps
        d["gbs"] = r.decode_bytes_per_step * steps / r.seconds / 1e9
        if peaks:
            d["pct_bandwidth"] = 100 * d["gbs"] / peaks["read_gbs"]
    return d


def fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec or ".1f")
    return str(v)


def markdown(table: list[dict], peaks: dict | None, run: Path) -> str:
    meas = "not measured" if not peaks else None
    head = ["stage", "phase", "s", "dtype", "prefill tok", "decoded tok", "trained tok", "GFLOP", "GFLOP/s",
            "% peak", "GB/s (decode)", "% bw", "notes"]
    lines = [f"# Roofline of {run}", ""]
    if peaks:
        g = peaks["gemm_gflops"]
        lines.append(f"Measured on {peaks['device']} in this run: GEMM peak fp32 {g['float32']:.1f} GFLOP/s, bf16 "
                     f"{g['bfloat16']:.1f} GFLOP/s ({peaks['gemm']}); read bandwidth {peaks['read_gbs']:.1f} GB/s "
                     f"({peaks['bandwidth']}); load average before measuring {peaks['load_average']}.")
    else:
        lines.append("Peaks: not measured (--no-measure).")
    lines += ["", "FLOPs = 2N per forward/decoded token, 6N per trained token, N = matmul parameters (LM head "
              "counted as a matmul, tied or not, wherever logits are computed; attention score/value products left out). "
              "'>=' marks a lower bound (see notes). Column definitions: bench/pipeline_roofline.py docstring.", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in table:
        gf = "-" if d["gflop"] is None else (">=" if d["gflop_lower_bound"] else "") + f"{d['gflop']:.1f}"
        note = "; ".join(d["notes"] + ([f"n/a: {d['work_na']}"] if d["work_na"] else []))
        lines.append("| " + " | ".join([
            d["stage"], d["phase"], fmt(d["seconds"]), fmt(d["dtype"]), fmt(d["prefill_tokens"]),
            fmt(d["decoded_tokens"]), fmt(d["trained_tokens"]), gf, fmt(d["gflops"]),
            meas or fmt(d["pct_peak"], ".2f"), fmt(d["gbs"], ".2f"),
            (meas if d["gbs"] is not None else None) or fmt(d["pct_bandwidth"], ".1f"), note.replace("|", "/")]) + " |")
    models = sorted({m for d in table for m in (d["model"] or "").split("; ") if m})
    lines += ["", "Models (N = matmul parameters with the LM head; body = without it): " + "; ".join(models), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/pipeline_roofline.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished pipeline run folder (with pipeline.json)")
    p.add_argument("--no-measure", action="store_true", help="skip measuring the GEMM peak and read bandwidth")
    args = p.parse_args(argv)
    run = Path(args.run)
    for d in (ROOT, ROOT / "bench"):  # train_*.py are imported for their exact tokenization and batch plans
        if str(d) not in sys.path:
            sys.path.insert(0, str(d))
    log = read_json(run / "pipeline.json")
    if not log.get("stages"):
        raise InputError(f"{run / 'pipeline.json'}: no stages recorded")
    dev = (log.get("config") or {}).get("device", "auto")
    device = "cuda" if dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available()) else "cpu"
    peaks = None if args.no_measure else measure_peaks(device)
    rows = stage_rows(run, log, dev)
    table = [cells(r, peaks) for r in rows]
    md = markdown(table, peaks, run)
    atomic_write_text(run / "roofline.md", md)
    atomic_write_json(run / "roofline.json", {"run": str(run), "peaks": peaks or "not measured", "rows": table,
                                              "command": "python bench/pipeline_roofline.py " + " ".join(
                                                  argv if argv is not None else sys.argv[1:])})
    print(md)
    return 0


if __name__ == "__main__":
    from minicai.infra.cli import run_cli

    sys.exit(run_cli(main))
