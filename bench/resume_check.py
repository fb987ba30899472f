"""Does a stopped and resumed run end where the uninterrupted one does? Tiny models, any device.

    python bench/resume_check.py [--stage 1] [--stops 2,4,6] [--json out.json] [-- extra trainer flags]

Trains the uninterrupted run twice (A, B: how far two identical runs drift apart on this device)
and once in pieces, each piece resuming `latest` (4 clips per epoch, so stops 2,4,6 resume
mid-epoch and at an epoch boundary). Prints max |difference| of the final weights: A vs B, A vs
the pieces. On CPU both are 0 (tests/test_train_e2e.py asserts it); on a GPU, A vs B shows what
non-deterministic kernels alone cost, and resuming should add nothing beyond that.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffueraser.checkpoints import load_checkpoint_models  # noqa: E402
from diffueraser.tiny import (write_synthetic_davis, write_synthetic_ytvos, write_tiny_motion_adapter,  # noqa: E402
                              write_tiny_sd)


def train(root, out, steps, stage, extra, resume=False):
    flags = ["--base_model_name_or_path", root / "sd", "--davis_root", root / "DAVIS", "--ytvos_root", root / "YTVOS",
             "--output_dir", out, "--resolution", 64, "--nframes", 2 if stage == 1 else 4, "--davis_repeat", 1,
             "--max_train_steps", steps, "--checkpointing_steps", 2, "--learning_rate", 1e-4, "--lr_warmup_steps", 0,
             "--seed", 0, "--report_to", "none", "--validation_steps", 100000, *extra]
    if stage == 2:
        flags += ["--pretrained_stage1", root / "stage1", "--motion_adapter_path", root / "adapter"]
    if resume:
        flags += ["--resume_from_checkpoint", "latest"]
    proc = subprocess.run([sys.executable, f"train_DiffuEraser_stage{stage}.py", *map(str, flags)], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"training {out} failed:\n{proc.stderr[-3000:]}")


def max_diff(a, b, step):
    sa, sb = (load_checkpoint_models(str(out / f"checkpoint-{step}")) for out in (a, b))
    return max((x[k].float() - y[k].float()).abs().max().item() for x, y in zip(sa, sb) for k in x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=1, choices=[1, 2])
    parser.add_argument("--stops", default="2,4,6", help="Steps the pieces stop at; the last is the run's length.")
    parser.add_argument("--json", default=None, help="Also write the result here.")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    stops = [int(s) for s in args.stops.split(",")]
    root = Path(tempfile.mkdtemp(prefix="resume_check_"))
    write_tiny_sd(str(root / "sd"))
    write_tiny_motion_adapter(str(root / "adapter"))
    write_synthetic_davis(str(root / "DAVIS"))
    write_synthetic_ytvos(str(root / "YTVOS"))
    if args.stage == 2:
        train(root, root / "stage1", 1, 1, ["--dataloader_num_workers", "0"])
    start = time.time()
    for name in ("a", "b"):
        train(root, root / name, stops[-1], args.stage, extra)
    for stop in stops:
        train(root, root / "pieces", stop, args.stage, extra, resume=True)
    result = {"stage": args.stage, "stops": stops, "extra": extra,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "a_vs_b": max_diff(root / "a", root / "b", stops[-1]),
              "a_vs_resumed": max_diff(root / "a", root / "pieces", stops[-1]), "seconds": round(time.time() - start)}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
