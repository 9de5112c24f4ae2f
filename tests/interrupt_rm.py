"""train_rm.py's main with a kill patched in, for the torchrun tests (the product has no
--stop-after flags: the interruption is test scaffolding and lives here).

    torchrun --nproc_per_node 2 tests/interrupt_rm.py labelling|checkpoint TRAIN_RM_ARGS...

labelling: every rank exits when it comes to append its second batch of preference records, i.e.
right after its first batch (records and dropped pairs) reached its file; checkpoint: every rank
exits right after the first reward-model checkpoint is written. Each rank first waits at a barrier,
so that all of them got that far (torchrun would otherwise tear down a rank still writing), then
leaves with os._exit(0), as a killed process leaves: no merge of the rank files, no cleanup.
(labelling needs every rank to have at least two batches.)"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

import train_rm  # noqa: E402


def die():
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def main(mode: str, argv: list[str]) -> int:
    if mode == "labelling":
        from minicai.infra import labelling as module  # where label_prompts finds its appender
        real, seen = module.append_jsonl, []

        def append(path, rows):
            if not Path(path).name.endswith(".dropped.jsonl"):
                if seen:
                    die()
                seen.append(path)
            real(path, rows)
        module.append_jsonl = append
    elif mode == "checkpoint":
        real_save = train_rm.save_checkpoint

        def save(*a, **kw):
            real_save(*a, **kw)  # every rank calls it (it ends with a barrier); rank 0 writes
            die()
        train_rm.save_checkpoint = save
    else:
        raise SystemExit(f"mode {mode!r}: labelling or checkpoint")
    return train_rm.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
