"""Run a training script (under torchrun or not) and end it right after its N-th checkpoint, as if
the job had been killed there: the test-side stand-in for a kill, since the scripts have no
--stop-after-* flag.

    torchrun --nproc_per_node 2 tests/kill_after_checkpoint.py N train_dpo.py [its flags...]

save_checkpoint is a collective that ends at a barrier, so every rank has written (rank 0) or
waited for the checkpoint when it returns; each rank then leaves the process group
(distributed.finish) and exits with status 0. In-process tests use conftest.kill_after instead."""
import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minicai.infra import distributed  # noqa: E402


def main() -> None:
    calls, script, argv = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # imported, not run: its __main__ guard stays off
    real, n = module.save_checkpoint, [0]

    def save_then_die(*a, **kw):
        out = real(*a, **kw)
        n[0] += 1
        if n[0] >= calls:
            distributed.finish(kw["d"] if "d" in kw else a[6])  # save_checkpoint(folder, model, tok, opt, step, meta, d)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return out

    module.save_checkpoint = save_then_die
    sys.exit(module.run_cli(module.main, argv))


if __name__ == "__main__":
    main()
