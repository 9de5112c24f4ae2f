"""SL-CAI traces on disk: slcai.traces' records appended to a JSONL file batch by batch, so that a
killed run resumes where it stopped and never redoes a finished prompt (a resumed run writes the
same trace as an uninterrupted one: a prompt's record depends only on its own seed)."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ..constitution import Constitution
from ..errors import InputError
from ..slcai import distill, traces
from .data import Prompt
from .files import append_jsonl, read_jsonl


def load_done(trace: Path) -> dict[str, dict]:
    """Records already in the trace, by prompt id. A torn last line (a crash mid-write) is
    dropped from the file; any other bad line is an error naming the line."""
    hint = "; delete the file to regenerate"
    done = {}
    for n, rec in read_jsonl(trace, "repair", hint, numbered=True):
        if not isinstance(rec.get("id"), (str, int)):
            raise InputError(f"{trace}: line {n}: not a trace record (no 'id'){hint}")
        done[rec["id"]] = rec
    return done



def run_slcai(model, tok, prompts: list[Prompt], constitution: Constitution, trace: Path, route: str = "revise",
              **kw) -> list[dict]:
    """Generate the traces of the prompts not yet in `trace` (route 'revise': slcai.traces; 'distill':
    slcai.distill; with its keyword arguments), appending each batch's records in one write (a killed
    run keeps the whole batch or none of it). Returns every record, old and new, in prompt order."""
    trace = Path(trace)
    trace.parent.mkdir(parents=True, exist_ok=True)
    done = load_done(trace)
    todo = [p for p in prompts if p.id not in done]
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="SL-CAI", unit="prompt")
    for rows in {"revise": traces, "distill": distill}[route](model, tok, todo, constitution, **kw):
        append_jsonl(trace, rows)
        done.update((rec["id"], rec) for rec in rows)
        bar.update(len(rows))
    bar.close()
    return [done[p.id] for p in prompts if p.id in done]
