"""Run a training script (under torchrun or not) and end it as if the job had been killed: the
test-side stand-in for a kill, since the scripts have no --stop-after-* flag (in-process tests use
conftest.kill_after instead).

    torchrun --nproc_per_node 2 tests/interrupt.py checkpoint N train_dpo.py [its flags...]
    torchrun --nproc_per_node 2 tests/interrupt.py labelling N train_rm.py [its flags...]

checkpoint N: every rank ends right after the script's N-th save_checkpoint returned (a collective
that ends at a barrier: rank 0 has written it). labelling N: every rank ends when it comes to
append its (N+1)-th batch of preference records (infra.labelling's appender; .dropped files do not
count), i.e. right after its first N batches reached its file. Each rank first waits at a barrier,
so that all of them got that far (torchrun would otherwise tear down a rank still writing), then
leaves with os._exit(0), as a killed process leaves: no merge of rank files, no cleanup."""
import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402


def die() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    mode, calls, script, argv = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # imported, not run: its __main__ guard stays off
    n = [0]
    if mode == "checkpoint":
        real = module.save_checkpoint

        def save_then_die(*a, **kw):
            out = real(*a, **kw)
            n[0] += 1
            if n[0] >= calls:
                die()
            return out
        module.save_checkpoint = save_then_die
    elif mode == "labelling":
        from minicai.infra import labelling  # where label_prompts finds its appender
        real = labelling.append_jsonl

        def append(path, rows):
            if not Path(path).name.endswith(".dropped.jsonl"):
                if n[0] >= calls:
                    die()
                n[0] += 1
            real(path, rows)
        labelling.append_jsonl = append
    else:
        raise SystemExit(f"mode {mode!r}: checkpoint or labelling")
    sys.exit(module.run_cli(module.main, argv))


if __name__ == "__main__":
    main()
