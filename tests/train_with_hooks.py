"""Run examples/train.py with test hooks patched into the libraries it calls, so that the script itself has none.

    python tests/train_with_hooks.py HOOK [HOOK ...] path/to/train.py [train.py arguments]

HOOKs:
- `kill_after_update=N`: SIGKILL the process once update N is done (when β of update N + 1 is asked for), before
  anything of update N + 1 runs.
- `kill_saving=NAME`: SIGKILL the process in the middle of writing checkpoint NAME (after accelerate's state, before
  the model folder and the manifest).
- `kill_merging=N`: SIGKILL the process after N files of the final model have been moved into --output_dir (a
  journalled save, `OutputFolder.commit_staged`).
- `dump_rank_weights=DIR`: at the end of training, every rank writes DIR/rank<R>.json: its rank, the number of
  processes, the distributed type, the optimizer's step count and a sha256 of its model's weights (equal iff the
  weights are bit-identical).
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import signal
import sys
from pathlib import Path


def weights_checksum(model) -> str:
    """sha256 over every parameter and buffer (sorted by name, raw bytes)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def install(hook: str, value: str) -> None:
    if hook == "kill_after_update":
        from dior_cvae.training import optimization

        kl_weight = optimization.kl_weight

        def killing_kl_weight(step, *args, **kwargs):
            if step == int(value):
                os.kill(os.getpid(), signal.SIGKILL)
            return kl_weight(step, *args, **kwargs)

        optimization.kl_weight = killing_kl_weight
    elif hook == "kill_saving":
        from accelerate import Accelerator

        save_state = Accelerator.save_state

        def killing_save_state(self, output_dir=None, **kwargs):
            result = save_state(self, output_dir, **kwargs)
            if Path(output_dir).name == f".{value}.tmp":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        Accelerator.save_state = killing_save_state
    elif hook == "kill_merging":
        from dior_cvae.training.outputs import OutputFolder

        def killing_move_staged(self, staging, files):
            for name in files[: int(value)]:
                (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, self.folder / name)
            os.kill(os.getpid(), signal.SIGKILL)

        OutputFolder._move_staged = killing_move_staged
    elif hook == "dump_rank_weights":
        from accelerate import Accelerator

        end_training = Accelerator.end_training

        def dumping_end_training(self):
            model = self.unwrap_model(self._models[0])
            steps = {int(s["step"]) for s in self._optimizers[0].optimizer.state.values() if "step" in s}
            Path(value).mkdir(parents=True, exist_ok=True)
            (Path(value) / f"rank{self.process_index}.json").write_text(json.dumps({
                "rank": self.process_index, "num_processes": self.num_processes,
                "distributed_type": str(self.distributed_type), "optimizer_steps": sorted(steps),
                "checksum": weights_checksum(model)}))
            return end_training(self)

        Accelerator.end_training = dumping_end_training
    else:
        raise SystemExit(f"train_with_hooks.py: unknown hook {hook!r}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    while argv and "=" in argv[0] and not argv[0].endswith(".py"):
        install(*argv.pop(0).split("=", 1))
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
