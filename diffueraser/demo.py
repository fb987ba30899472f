"""The whole two-stage job on tiny random models and synthetic videos, on CPU, in a few minutes.

    python -m diffueraser.demo --out demo_out

Runs the real entry scripts: stage 1 -> convert -> stage 2 -> convert, each with validation,
and prints where the weights and the validation GIFs are. Ends with the learning check
(diffueraser/learning_check.py): tiny stage-1 models trained 300 steps, evaluated against their
untrained start on held-out synthetic videos.
"""
import argparse
import glob
import os
import subprocess
import sys
import time

from diffueraser.learning_check import MIN_RISE_DB, run_check
from diffueraser.tiny import write_synthetic_davis, write_synthetic_ytvos, write_tiny_motion_adapter, write_tiny_sd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    print("+ " + " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    print(f"  ({time.time() - start:.0f} s)", flush=True)


def common_flags(out, data, stage_dir, steps, nframes):
    davis = os.path.join(data, "DAVIS")
    return ["--base_model_name_or_path", os.path.join(out, "weights", "tiny-sd"),
            "--davis_root", davis, "--ytvos_root", os.path.join(data, "YTVOS"),
            "--output_dir", stage_dir, "--resolution", "64", "--nframes", str(nframes),
            "--latent_cache", os.path.join(out, "latent_cache"),  # as the scripts: built by stage 1, read by stage 2
            "--compile", "0",  # tiny models: compiling would take longer than training
            "--max_train_steps", str(steps), "--checkpointing_steps", str(max(1, steps // 2)),
            "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "tensorboard",
            "--validation_steps", str(steps), "--validation_inference_steps", "2",
            "--validation_image", str([os.path.join(davis, "JPEGImages", "480p", "bear")]),
            "--validation_mask", str([os.path.join(davis, "Annotations", "480p", "bear")])]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="Folder for models, data, runs and weights.")
    parser.add_argument("--steps", type=int, default=6, help="Training steps per stage.")
    parser.add_argument("--no_learning_check", action="store_true",
                        help="End after stage 2 (CI: tests/test_learning_check.py runs the same check).")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    data, weights = os.path.join(out, "data"), os.path.join(out, "weights")
    print(f"writing tiny random models and a synthetic DAVIS / YouTube-VOS tree to {out}")
    write_tiny_sd(os.path.join(weights, "tiny-sd"))
    write_tiny_motion_adapter(os.path.join(weights, "tiny-motion-adapter"))
    write_synthetic_davis(os.path.join(data, "DAVIS"))
    write_synthetic_ytvos(os.path.join(data, "YTVOS"))
    py = sys.executable
    stage1, stage2 = os.path.join(out, "finetune-stage1"), os.path.join(out, "finetune-stage2")
    converted1, converted2 = os.path.join(out, "converted", "stage1"), os.path.join(out, "converted", "stage2")
    run([py, "train_DiffuEraser_stage1.py", *common_flags(out, data, stage1, args.steps, 4),
         "--channels_last", "1"])  # as finetune_stage1.sh
    run([py, "save_checkpoint_stage1.py", "--input_dir", os.path.join(stage1, "latest"), "--output_dir", converted1,
         "--force"])
    run([py, "train_DiffuEraser_stage2.py", *common_flags(out, data, stage2, args.steps, 6),
         "--pretrained_stage1", converted1, "--motion_adapter_path", os.path.join(weights, "tiny-motion-adapter")])
    run([py, "save_checkpoint_stage2.py", "--input_dir", os.path.join(stage2, "latest"), "--output_dir", converted2,
         "--force"])
    gifs = sorted(glob.glob(os.path.join(out, "finetune-stage*", "logs", "samples", "*", "*.gif")))
    print("\ndemo finished")
    print(f"  stage-1 weights: {converted1}/unet_main, {converted1}/brushnet")
    print(f"  stage-2 weights: {converted2}/unet_main, {converted2}/brushnet")
    print("  validation GIFs (masked input | result | ground truth):")
    for gif in gifs:
        print(f"    {gif}")
    if not gifs:
        raise SystemExit("no validation GIF was written")
    if args.no_learning_check:
        return
    print("\nlearning check: tiny stage-1 models trained 300 steps vs their untrained start (held-out videos)",
          flush=True)
    started = time.time()
    results = run_check(os.path.join(out, "learning_check"))
    means = results["means"]
    rise = means["trained"]["psnr_hole"] - means["untrained"]["psnr_hole"]
    print(f"  ({time.time() - started:.0f} s) hole PSNR {means['untrained']['psnr_hole']:.2f} -> "
          f"{means['trained']['psnr_hole']:.2f} dB ({rise:+.2f} dB; the test asks for more than "
          f"+{MIN_RISE_DB} dB)")


if __name__ == "__main__":
    main()
