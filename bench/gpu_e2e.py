"""The real scripts end to end, as a user runs them, with the figures a user plans by.

    python bench/gpu_e2e.py OUT            # SD1.5-size random weights, 480p/720p synthetic tree, GPU, fp16
    python bench/gpu_e2e.py OUT --tiny     # micro models on CPU, bf16, stage 1 compiled (the tests run this)

Writes random weights (text encoder, VAE, UNet, motion adapter, a tokenizer that needs no
download) and a synthetic DAVIS (480p) / YouTube-VOS (720p) tree, then runs, each through its
shell script or converter exactly as train.md says:

  finetune_stage1.sh  (validation on, 4 loader workers, LATENT_CACHE=OUT/latent_cache)
  -> SIGTERM after a few steps (must save and exit 0) -> finetune_stage1.sh again (resumes from
  `latest`, torch's default compile cache deleted first, as on a fresh machine: only the run's
  own compile_cache is left)
  -> save_checkpoint_stage1.py -> finetune_stage2.sh -> save_checkpoint_stage2.py

and prints: time to the first step (fresh and on resume), s/step through the scripts, peak GPU
memory, checkpoint size and save time, converter time, and whether every validation wrote its
GIF. Exits 1 if any of it failed. Each stage run fits the device's 10-minute call; run the whole
thing detached (`setsid python bench/gpu_e2e.py OUT > OUT.log 2>&1 &`) and poll.
"""
import argparse
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (stage-1 steps, SIGTERM after this step, stage-1 validation every, stage-2 steps): the last
# validation of each stage is the end-of-run one (the step count is no multiple of the interval)
PLAN = {"tiny": dict(steps1=60, stop_after=2, val1=25, steps2=3),
        "full": dict(steps1=16, stop_after=6, val1=8, steps2=12)}


def write_assets(out, tiny):
    from diffueraser.tiny import write_synthetic_davis, write_synthetic_ytvos, write_tiny_motion_adapter, write_tiny_sd

    weights, data = os.path.join(out, "weights"), os.path.join(out, "data")
    if not os.path.isdir(os.path.join(weights, "sd")):
        write_tiny_sd(os.path.join(weights, "sd"), size="micro" if tiny else "full")
        write_tiny_motion_adapter(os.path.join(weights, "adapter"), size="micro" if tiny else "full")
    nframes = 12 if tiny else 26  # stage 2 clips have 22 frames
    davis_size, ytvos_size = ((64, 96), (72, 128)) if tiny else ((480, 854), (720, 1280))
    if not os.path.isdir(os.path.join(data, "DAVIS")):
        write_synthetic_davis(os.path.join(data, "DAVIS"), nframes=nframes, size=davis_size)
        write_synthetic_ytvos(os.path.join(data, "YTVOS"), nframes=nframes, size=ytvos_size)
    return weights, data


class Report:
    """Figures and failures, printed as one table at the end."""

    def __init__(self):
        self.rows, self.failures = [], []

    def add(self, what, value):
        self.rows.append((what, value))
        print(f"  {what}: {value}", flush=True)

    def fail(self, what):
        self.failures.append(what)
        print(f"  FAILED: {what}", flush=True)

    def print(self):
        print("\n| figure | value |\n|---|---|")
        for what, value in self.rows:
            print(f"| {what} | {value} |")
        print("\nall steps passed" if not self.failures else "\nFAILED:\n" + "\n".join(f"- {f}" for f in self.failures))


STALL = re.compile(r"^Timeout \(\d+:\d\d:\d\d(\.\d+)?\)!$", re.M)  # faulthandler's header: the trainer's stall watch


def kill_tree(proc):
    """SIGKILL a script and everything it started: run_logged.sh puts the launcher in a session of
    its own, so the script's process group does not hold the trainers."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.kill()


def run_script(script, env, extra, log, report, stop_after=None, timeout=3600):
    """Run a finetune script; returns (exit code, seconds to the first step, seconds in all).

    stop_after: send SIGTERM to the script once the log shows that many finished steps. A run whose
    stall watch fires (its stacks in the log) or that outlives `timeout` is killed and fails the report.
    """
    start = time.time()
    proc = subprocess.Popen(["bash", os.path.join(REPO, script), *extra], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = None
    offset = os.path.getsize(log) if os.path.exists(log) else 0
    while proc.poll() is None and time.time() - start < timeout:
        text = read_from(log, offset)
        if first is None and "first step done" in text:
            first = time.time() - start
        if STALL.search(text):  # the trainer's stall watch fired: its stacks are in the log; end it now
            report.fail(f"{script} stalled: no step for --stall_dump_minutes; every thread's stack is in {log}")
            break
        if stop_after is not None and steps_done(text) >= stop_after:
            proc.send_signal(signal.SIGTERM)
            stop_after = None
        time.sleep(0.5)
    if proc.poll() is None:
        if time.time() - start >= timeout:
            report.fail(f"{script} still running after {timeout} s: killed")
        kill_tree(proc)
    code = proc.wait()
    if first is None and "first step done" in read_from(log, offset):
        first = time.time() - start
    return code, first, time.time() - start


def read_from(path, offset):
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        f.seek(offset)
        return f.read()


def steps_done(text):
    """The highest 'N/M' of the training progress bar in a log (not the model loaders' bars)."""
    done = re.findall(r"stage\d: +\d+%\|[^|]*\| (\d+)/\d+ \[", text)
    return max(map(int, done)) if done else 0


def seconds_per_step(run_dir):
    """Median wall time between consecutive logged steps (TensorBoard events of the run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times = {}
    for events in glob.glob(os.path.join(run_dir, "logs", "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(os.path.dirname(events)).Reload()
        if "loss" in acc.Tags()["scalars"]:
            times.update({e.step: e.wall_time for e in acc.Scalars("loss")})
    gaps = [times[s] - times[s - 1] for s in sorted(times) if s - 1 in times]
    return statistics.median(gaps) if gaps else float("nan")


def log_figures(text):
    """Figures the trainer prints: peak memory, checkpoint save times, validation failures, the CUDA graph's fate."""
    peak = re.findall(r"peak GPU memory: ([\d.]+) GiB allocated, ([\d.]+) GiB reserved", text)
    saves = re.findall(r"saved (\S+) in ([\d.]+) s", text)
    first = re.findall(r"first step done (\d+) s after start, (\d+) s of it in the step", text)
    failed = re.findall(r"validation at step \d+ failed: .*", text)
    cache = re.findall(r"latent cache \S+: (\d+) videos encoded in (\d+) s, (\d+) read", text)
    graph = None  # the trainer's words (diffueraser/speed.py, StepGraph.capture)
    if "the steps run without the graph from here" in text:
        graph = "dropped: its capture ran out of memory, the steps ran without it"
    elif "trying once more with the optimizer's state in host memory" in text:
        graph = "captured at the second try, the optimizer's state in host memory meanwhile"
    elif "CUDA graph is on" in text:
        graph = "captured"
    return peak, saves, first, failed, cache, graph


def folder_gb(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e9


def check_gifs(report, run_dir, stage, steps, expected_clips=2):
    """Every validation (step 0, each multiple of the interval, the end) wrote a GIF per clip."""
    samples = os.path.join(run_dir, "logs", "samples")
    found = {int(d.split("-")[1]): len(glob.glob(os.path.join(samples, d, "*.gif")))
             for d in os.listdir(samples)} if os.path.isdir(samples) else {}
    for step in steps:
        if found.get(step, 0) < expected_clips:
            report.fail(f"{stage}: validation at step {step} wrote {found.get(step, 0)} of {expected_clips} GIFs")
    report.add(f"{stage} validation GIFs (step: count)", ", ".join(f"{s}: {n}" for s, n in sorted(found.items())))


def stage_figures(report, stage, run_dir, log_text, cached):
    peak, saves, first, failed, cache, graph = log_figures(log_text)
    for line in failed:
        report.fail(f"{stage}: {line}")
    if cache:  # one line per start of the script
        report.add(f"{stage} latent cache (videos encoded, s, read)", " ; ".join(f"{n}, {s}, {r}" for n, s, r in cache))
    elif cached:
        report.fail(f"{stage}: the scripts' latent cache was not used (no 'latent cache ... encoded' line)")
    report.add(f"{stage} s/step through the script (median)", f"{seconds_per_step(run_dir):.3f}")
    if graph:
        report.add(f"{stage} CUDA graph", graph)
    if peak:
        report.add(f"{stage} peak GPU memory, GiB (allocated / reserved)", " ; ".join(f"{a} / {r}" for a, r in peak))
    for path, secs in saves:
        if os.path.isdir(path):
            report.add(f"{stage} checkpoint {os.path.basename(path)}", f"{folder_gb(path):.1f} GB saved in {secs} s")
        else:
            report.add(f"{stage} checkpoint {os.path.basename(path)}", f"saved in {secs} s (since pruned)")
    for total, in_step in first:
        report.add(f"{stage} trainer: first step after (s from start, s of it in the step)", f"{total}, {in_step}")


def fresh_compile_caches():
    """Delete torch's default compile caches, as a new machine would not have them."""
    import getpass

    for path in (os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}"),
                 os.path.expanduser("~/.triton/cache")):
        shutil.rmtree(path, ignore_errors=True)


def converter(report, script, args, what):
    start = time.time()
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, capture_output=True,
                          text=True)
    report.add(f"{what} converter time, s", f"{time.time() - start:.0f}")
    if proc.returncode:
        report.fail(f"{script} exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.returncode == 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="Work folder (weights, data, runs; ~60 GB at full size).")
    parser.add_argument("--tiny", action="store_true",
                        help="Micro models on CPU in bf16, stage 1 compiled (what the tests run; a few minutes).")
    parser.add_argument("--compile", type=int, choices=[0, 1], default=None,
                        help="Pass --compile to both stages (default: the scripts' own, on with CUDA).")
    parser.add_argument("--stage1_only", action="store_true", help="Stop after stage 1's converter (less device time).")
    parser.add_argument("--extra", default="", help="More flags for both training scripts, one string.")
    parser.add_argument("--extra1", default="",
                        help="Flags for stage 1 only: --extra1=--use_8bit_adam (a value starting with -- needs the =).")
    parser.add_argument("--stage2_only", action="store_true",
                        help="Stage 2 alone, from a stage 1 made of the base UNet and a BrushNet copied from it.")
    parser.add_argument("--no_convert", action="store_true", help="Skip the converters (less disk).")
    parser.add_argument("--no_latent_cache", action="store_true",
                        help="LATENT_CACHE= (off). By default, as the scripts: LATENT_CACHE=OUT/latent_cache for both "
                             "(built by stage 1, read by its resume and by stage 2; fails if a run did not use it).")
    parser.add_argument("--no_stop", action="store_true",
                        help="Stage 1 in one run, without the SIGTERM and resume (a memory smoke: less disk and time).")
    args = parser.parse_args(argv)
    if args.no_convert and not (args.stage1_only or args.stage2_only):
        parser.error("--no_convert: stage 2 starts from stage 1's converted folder; add --stage1_only or --stage2_only")
    out = os.path.abspath(args.out)
    plan = PLAN["tiny" if args.tiny else "full"]
    report = Report()
    start = time.time()
    weights, data = write_assets(out, args.tiny)
    report.add("writing weights and data, s", f"{time.time() - start:.0f}")
    stage1, stage2 = os.path.join(out, "finetune-stage1"), os.path.join(out, "finetune-stage2")
    converted1, converted2 = os.path.join(out, "converted", "stage1"), os.path.join(out, "converted", "stage2")
    for path in (stage1, stage2, converted1, converted2):
        shutil.rmtree(path, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(BASE_MODEL=os.path.join(weights, "sd"), VAE=os.path.join(weights, "sd"),
               MOTION_ADAPTER=os.path.join(weights, "adapter"), DAVIS=os.path.join(data, "DAVIS"),
               YTBV=os.path.join(data, "YTVOS"), STAGE1=converted1, PYTHONUNBUFFERED="1",
               MIXED_PRECISION="bf16" if args.tiny else "fp16",
               LATENT_CACHE="" if args.no_latent_cache else os.path.join(out, "latent_cache"))  # both stages share it
    common = ["--checkpoints_total_limit", "1", "--checkpointing_steps", "1000"]
    if args.tiny:
        common += ["--resolution", "32", "--validation_inference_steps", "2"]
    else:  # a hang shows its stacks and ends the run after 8 minutes (a first step compiles for ~5)
        common += ["--stall_dump_minutes", "8"]
    if args.compile is not None:
        common += ["--compile", str(args.compile)]
    common += args.extra.split()

    if args.stage2_only:
        stage1_from_base(os.path.join(weights, "sd"), converted1)
        return run_stage2(args, report, env, common, plan, stage2, converted2, start)
    print("stage 1: fresh start" + ("" if args.no_stop else ", SIGTERM after a few steps"), flush=True)
    log1 = os.path.join(stage1, "train_stage1.log")
    flags1 = [*common, "--nframes", "2" if args.tiny else "10", "--max_train_steps", str(plan["steps1"]),
              "--validation_steps", str(plan["val1"]), *args.extra1.split()]
    if args.tiny and args.compile is None:  # the GPU default, compiled, on a CPU: stage 1 only (minutes)
        flags1 += ["--compile", "1"]
    code, first, secs = run_script("finetune_stage1.sh", dict(env, OUTPUT_DIR=stage1), flags1, log1, report,
                                   stop_after=None if args.no_stop else plan["stop_after"])
    report.add("stage 1 fresh: time to the first step through the script, s", f"{first or float('nan'):.0f}")
    if args.no_stop:
        if code != 0:
            report.fail(f"stage 1 exited {code}")
    else:
        if code != 0 or "stopped at step" not in read_from(log1, 0):
            report.fail(f"stage 1: SIGTERM did not give a saved stop (exit {code})")
        print("stage 1: resume from latest, with only the run's own compile cache", flush=True)
        if not args.tiny:  # on a shared CPU (the tests) other processes may be using torch's default cache
            fresh_compile_caches()
        offset = os.path.getsize(log1)
        code, first, secs = run_script("finetune_stage1.sh", dict(env, OUTPUT_DIR=stage1), flags1, log1, report)
        report.add("stage 1 resume: time to the first step through the script, s", f"{first or float('nan'):.0f}")
        if code != 0 or "resuming from" not in read_from(log1, offset):
            report.fail(f"stage 1: the resumed run exited {code} or did not resume")
    stage_figures(report, "stage 1", stage1, read_from(log1, 0), bool(env["LATENT_CACHE"]))
    check_gifs(report, stage1, "stage 1", sorted({0, plan["val1"], plan["steps1"]}))
    if not args.no_convert:
        converter(report, "save_checkpoint_stage1.py", ["--input_dir", os.path.join(stage1, "latest"),
                                                        "--output_dir", converted1], "stage 1")
    if not args.tiny:  # disk: a stage-1 checkpoint is ~20 GB
        for ckpt in glob.glob(os.path.join(stage1, "checkpoint-*")):
            shutil.rmtree(ckpt, ignore_errors=True)

    if args.stage1_only:
        return finish(report, out, start)
    return run_stage2(args, report, env, common, plan, stage2, converted2, start)


def stage1_from_base(sd, target):
    """A converted stage 1 (unet_main/, brushnet/) without training: the base UNet and a BrushNet made from it."""
    from diffueraser.convert import load_unet2d
    from libs.brushnet_CA import BrushNetModel

    if not os.path.isdir(os.path.join(target, "brushnet")):
        os.makedirs(target, exist_ok=True)
        os.symlink(os.path.join(sd, "unet"), os.path.join(target, "unet_main"))
        BrushNetModel.from_unet(load_unet2d(os.path.join(sd, "unet"))).save_pretrained(os.path.join(target, "brushnet"))


def run_stage2(args, report, env, common, plan, stage2, converted2, start):
    out = os.path.dirname(stage2)
    print("stage 2", flush=True)
    log2 = os.path.join(stage2, "train_stage2.log")
    flags2 = [*common, "--nframes", "4" if args.tiny else "22", "--max_train_steps", str(plan["steps2"]),
              "--validation_steps", "1000"]
    code, first, secs = run_script("finetune_stage2.sh", dict(env, OUTPUT_DIR=stage2), flags2, log2, report)
    report.add("stage 2 fresh: time to the first step through the script, s", f"{first or float('nan'):.0f}")
    if code != 0:
        report.fail(f"stage 2 exited {code}")
    stage_figures(report, "stage 2", stage2, read_from(log2, 0), bool(env["LATENT_CACHE"]))
    check_gifs(report, stage2, "stage 2", [0, plan["steps2"]])
    if not args.no_convert:
        converter(report, "save_checkpoint_stage2.py", ["--input_dir", os.path.join(stage2, "latest"),
                                                        "--output_dir", converted2], "stage 2")
    return finish(report, out, start)


def finish(report, out, start):
    """Print the table, write e2e_report.json; the exit code (1 if anything failed)."""
    report.add("total, s", f"{time.time() - start:.0f}")
    report.print()
    with open(os.path.join(out, "e2e_report.json"), "w") as f:
        json.dump({"figures": report.rows, "failures": report.failures}, f, indent=1)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
