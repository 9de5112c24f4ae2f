"""bench/pipeline_roofline.py on a tiny finished pipeline run: a row per stage and sub-phase, token
counts equal to hand counts of texts we wrote into the run's files, the FLOP formula, and both the
measured and the --no-measure tables. No timings are asserted."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from minicai.experiments.pipeline import main as pipeline_main

pytestmark = pytest.mark.slow  # the tiny pipeline takes about a minute on 2 cores

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--sl-prompts", "4", "--sl-rounds", "1", "--rm-prompts", "8", "--rm-k", "3", "--ppo-iterations", "2",
        "--ppo-batch", "4", "--max-new-tokens", "8", "--eval-red-team", "2", "--eval-helpful", "2",
        "--constitution", "hhh", "--eval-harmful", "3", "--eval-benign", "2", "--bigbench", "none",
        "--feedback-model", "base", "--feedback-model", "base:contrast"]
# the tiny model (tests/conftest.py tiny_config): d=64, 2 blocks, 4 heads of 16, 2 KV heads, F=128, V=264
BODY = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)  # q, k, v, o, gate/up/down = 73728
HEAD = 64 * 264  # 16896
N = BODY + HEAD  # 90624


def load_script():
    spec = importlib.util.spec_from_file_location("pipeline_roofline", ROOT / "bench" / "pipeline_roofline.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pipeline_roofline"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def rewrite_jsonl(path: Path, fn) -> list[dict]:
    rows = [fn(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def run(tiny_gguf, tmp_path_factory):
    """A finished tiny run whose texts and timings we then overwrite with values we can count by hand
    (the tiny tokenizer is byte-level with the merges 'in', 'he', ...: 'abc' = 3 tokens, 'inin' = 2)."""
    out = tmp_path_factory.mktemp("roofline") / "run"
    assert pipeline_main(["--out", str(out), "--model", str(tiny_gguf), *TINY]) == 0

    def trace(r):
        r.update(initial="abc", final="inin", rounds=[{**x, "critique": "xyz", "revision": "inin"}
                                                        for x in r["rounds"]])
        return r
    traces = rewrite_jsonl(out / "sl" / "traces.jsonl", trace)
    for name in ("preferences.jsonl", "preferences.dropped.jsonl"):
        if (out / "rm" / name).exists():
            rewrite_jsonl(out / "rm" / name, lambda r: {**r, **({"response": "qqqq"} if "response" in r else
                                                               {"response_a": "qqqq", "response_b": "zzzz"})})
    summ = json.loads((out / "rm" / "summary.json").read_text())
    summ["seconds"].update(feedback_generate_s=2.0, feedback_judge_s=3.0, reward_model_s=4.0, normalise_s=0.5)
    (out / "rm" / "summary.json").write_text(json.dumps(summ))
    lengths = iter([2.5, 3.5])
    rewrite_jsonl(out / "ppo" / "metrics.jsonl", lambda r: {**r, "response/length": next(lengths),
                                                           "time/rollout": 1.5, "time/update": 0.25})
    res = json.loads((out / "eval" / "eval.json").read_text())
    for s in res["samples"]:
        s["responses"]["base"] = "ab"
    (out / "eval" / "eval.json").write_text(json.dumps(res))
    return out, traces, len(res["samples"])


def rows_of(out: Path) -> dict:
    table = json.loads((out / "roofline.json").read_text())
    return {(r["stage"], r["phase"]): r for r in table["rows"]}, table


def test_no_measure_table_has_a_row_per_stage_and_hand_counted_tokens(run, capsys):
    out, traces, n_samples = run
    mod = load_script()
    assert mod.matmul_params(tiny_config()) == (BODY, HEAD)
    assert mod.main([str(out), "--no-measure"]) == 0
    printed = capsys.readouterr().out
    rows, table = rows_of(out)
    assert table["peaks"] == "not measured" and "not measured" in printed
    assert (out / "roofline.md").read_text().strip() == printed.strip()
    stages = set(json.loads((out / "pipeline.json").read_text())["stages"])
    assert stages == {"round1/sl", "round1/rm", "round1/ppo", "dpo", "eval"}
    for st in stages:
        assert (st, "(stage total)") in rows, st
    for phase in ("generate (critique -> revision)", "SFT"):
        assert ("round1/sl", phase) in rows
    for phase in ("sample responses", "judge (label pairs)", "RM train (+ evaluation)", "normalise"):
        assert ("round1/rm", phase) in rows
    for phase in ("rollout", "score + ref + values", "update"):
        assert ("round1/ppo", phase) in rows
    assert ("eval", "generate base") in rows and ("eval", "judge-free sl") in rows and ("eval", "reward model") in rows

    # SL-CAI: 'abc' (3) + per round 'xyz' (3) + 'inin' (2) decoded per trace; FLOPs 2N per decoded token
    gen = rows[("round1/sl", "generate (critique -> revision)")]
    n_rounds = sum(len(t["rounds"]) for t in traces)
    assert gen["decoded_tokens"] == 3 * len(traces) + 5 * n_rounds
    assert gen["gflop"] == pytest.approx(2 * N * gen["decoded_tokens"] / 1e9)
    assert gen["gflop_lower_bound"] and gen["pct_peak"] is None and gen["pct_bandwidth"] is None
    # weight bytes per decode step: every matmul parameter once, 2 or 4 bytes as the generation dtype
    assert gen["weight_bytes_per_step"] == N * (2 if gen["dtype"] == "bfloat16" else 4)
    rows_b = min(8, len(traces))  # --gen-batch-size 8
    assert gen["decode_steps"] == pytest.approx(gen["decoded_tokens"] / rows_b)
    # the reward stage: 8 prompts x k = 3 responses of 'qqqq' or 'zzzz' (4 tokens) each (two different texts:
    # a pair of identical responses is left out by the preference reader), seconds from summary.json
    sample = rows[("round1/rm", "sample responses")]
    assert sample["decoded_tokens"] == 8 * 3 * 4 and sample["seconds"] == 2.0
    assert rows[("round1/rm", "judge (label pairs)")]["seconds"] == 3.0
    assert rows[("round1/rm", "judge (label pairs)")]["prefill_tokens"] > 0
    assert rows[("round1/rm", "normalise")]["seconds"] == 0.5
    # the reward model trains body-only: 6 * BODY per trained token, 2 * BODY per scored one
    trn = rows[("round1/rm", "RM train (+ evaluation)")]
    assert trn["gflop"] == pytest.approx((6 * BODY * trn["trained_tokens"] + 2 * BODY * trn["prefill_tokens"]) / 1e9)
    # PPO: response/length 2.5 and 3.5 over 4 rows -> 10 + 14 decoded; rollout seconds 2 x 1.5
    roll = rows[("round1/ppo", "rollout")]
    assert roll["decoded_tokens"] == 24 and roll["seconds"] == 3.0 and rows[("round1/ppo", "update")]["seconds"] == 0.5
    assert roll["decode_steps"] == pytest.approx(24 / 4)
    # evaluation: base replied 'ab' (2 tokens) to each held-out prompt (2 red-team + 2 helpful)
    assert n_samples == 4 and rows[("eval", "generate base")]["decoded_tokens"] == 2 * 4
    # a stage total sums its sub-phases' work
    tot = rows[("round1/ppo", "(stage total)")]
    assert tot["gflop"] == pytest.approx(sum(rows[("round1/ppo", p)]["gflop"]
                                             for p in ("rollout", "score + ref + values", "update")))


def test_measured_peaks_fill_the_percentages(run, capsys):
    out, _, _ = run
    assert load_script().main([str(out)]) == 0
    printed = capsys.readouterr().out
    rows, table = rows_of(out)
    peaks = table["peaks"]
    assert peaks["gemm_gflops"]["float32"] > 0 and peaks["gemm_gflops"]["bfloat16"] > 0 and peaks["read_gbs"] > 0
    assert "not measured" not in printed and "GEMM peak fp32" in printed
    gen = rows[("round1/sl", "generate (critique -> revision)")]
    peak = peaks["gemm_gflops"]["bfloat16" if gen["dtype"] == "bfloat16" else "float32"]
    assert gen["pct_peak"] == pytest.approx(100 * gen["gflops"] / peak)
    assert gen["pct_bandwidth"] == pytest.approx(100 * gen["gbs"] / peaks["read_gbs"])
    assert gen["gbs"] == pytest.approx(gen["weight_bytes_per_step"] * gen["decode_steps"] / gen["seconds"] / 1e9)


def test_an_unfinished_run_is_a_one_line_error(tmp_path):
    from minicai.errors import InputError

    with pytest.raises(InputError, match="pipeline.json: missing"):
        load_script().main([str(tmp_path), "--no-measure"])
