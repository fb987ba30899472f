"""Crash-safe accelerate checkpoints: atomic writes, `latest`, rotation, and reading them back.

A checkpoint is written to `checkpoint-N.partial/` and renamed to `checkpoint-N/` only after
`accelerator.save_state` returned on every process, so a save cut short by a crash or a full
disk is never taken for the latest one. Inside, accelerate's own layout is kept (the same as the
original DiffuEraser scripts): `model.safetensors` holds the first prepared model (the UNet),
`model_1.safetensors` the second (BrushNet, stage 1 only), plus optimizer, LR schedule and RNG.
"""
import errno
import hashlib
import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MODEL_FILES = ("model.safetensors", "model_1.safetensors")
COMPLETE = "checkpoint_complete.json"  # written last, before the rename; DeepSpeed saves no MODEL_FILES


def is_complete(path):
    """Ours carry the marker; the original scripts' checkpoints at least their model file."""
    return os.path.isfile(os.path.join(path, COMPLETE)) or os.path.isfile(os.path.join(path, MODEL_FILES[0]))


def list_checkpoints(output_dir):
    """Complete checkpoints in `output_dir`, oldest first, as (step, path)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def find_latest_checkpoint(output_dir):
    """Path of the newest complete checkpoint in `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(spec, output_dir):
    """`latest`, a run folder, or a checkpoint folder -> checkpoint path (None if `latest` finds none).
    A `.partial` folder is refused (ValueError) even when its files look complete: its save never
    reached the rename that marks it done."""
    if spec == "latest":
        return find_latest_checkpoint(output_dir)
    if is_partial(spec):
        raise ValueError(f"{spec} is a checkpoint save that never finished (.partial); give checkpoint-<step>, "
                         "the run folder or latest")
    for path in (spec, os.path.join(output_dir, spec)):
        if is_complete(path):
            return path
        if os.path.isdir(path) and list_checkpoints(path):
            return find_latest_checkpoint(path)
    raise FileNotFoundError(f"{spec}: not a complete checkpoint folder nor a run folder with one")


def is_partial(path):
    return os.path.basename(os.path.normpath(path)).endswith(".partial")


def checkpoint_step(path):
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if not m:
        raise ValueError(f"{path}: checkpoint folders are named checkpoint-<step>")
    return int(m.group(1))


def _fsync_tree(path):
    """Flush a folder's files and the folder itself to disk (a rename is only as safe as this).
    A filesystem that refuses fsync gets a warning, not a failed save."""
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                print(f"warning: could not flush {path} to disk ({e}); the checkpoint is saved but a power "
                      "cut right now could lose it")
                return
        _fsync_dir(root)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fingerprint(folder, edge=8 << 20):
    """A cheap identity of a weights folder: each weight file's name, size, and a hash of its first
    and last 8 MB (the header and the data around it), so a re-converted or swapped model differs.
    Not a full hash: an edit in the middle of a large file that keeps its size goes unseen."""
    found = {}
    for name in sorted(os.listdir(folder)):
        file = os.path.join(folder, name)
        if not name.endswith((".safetensors", ".bin")) or not os.path.isfile(file):
            continue
        size = os.path.getsize(file)
        h = hashlib.sha256()
        with open(file, "rb") as f:
            h.update(f.read(edge))
            if size > edge:
                f.seek(max(edge, size - edge))
                h.update(f.read(edge))
        found[name] = f"{size}:{h.hexdigest()[:16]}"
    return found


def read_marker(path):
    """The completion marker's content ({} for checkpoints written by the original scripts)."""
    try:
        with open(os.path.join(path, COMPLETE)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):  # none, or one left empty by a crash before fsync existed
        return {}


def save_checkpoint(accelerator, output_dir, step, total_limit=None, marker=None):
    """Save the full training state as `output_dir/checkpoint-<step>` (atomically, flushed to disk
    before the rename); `marker` adds entries to its completion marker. Returns its path.

    A full disk stops the run with one line (SystemExit) on every process, the half-written
    `.partial` removed and the previous checkpoint untouched."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = final + ".partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    full = _agree_disk_full(accelerator, _disk_full_during(lambda: accelerator.save_state(partial)))
    if not full and accelerator.is_main_process:
        full = _disk_full_during(lambda: _complete(partial, final, step, marker))
    if _agree_disk_full(accelerator, full):
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise SystemExit(disk_full_message(output_dir, final))
    if accelerator.is_main_process and total_limit is not None:  # only once the new one is complete
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _complete(partial, final, step, marker):
    """Mark `partial` complete, flush it, and rename it to `final` (main process)."""
    with open(os.path.join(partial, COMPLETE), "w") as f:
        json.dump({"step": step, **(marker or {})}, f, indent=1)
    _fsync_tree(partial)  # a power cut after the rename must not leave a "complete" empty folder
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(os.path.dirname(final))


# ----------------------------------------------------------------------------- a full disk
FULL_SIZE_NEEDS = "a stage-1 checkpoint needs ~20 GB (stage 2 ~8.3 GB) at SD1.5 size"
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "unexpected pos")


def is_disk_full(error):
    """True for the ways a full disk surfaces in a save: OSError ENOSPC/EDQUOT, torch.save's
    `[enforce fail at inline_container.cc] unexpected pos`, safetensors' `os error 28`
    (also when wrapped by another exception)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _disk_full_during(write):
    """Run `write()`; True if it ran out of disk space, False if it worked; other errors propagate."""
    try:
        write()
    except Exception as e:
        if is_disk_full(e):
            return True
        raise
    return False


def _agree_disk_full(accelerator, full):
    """True on every process if any process ran out of space (one process: no communication)."""
    if accelerator.num_processes == 1:
        return bool(full)
    import torch

    flag = torch.tensor([float(bool(full))], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def gigabytes(n):
    return f"{n / 2**30:.1f} GB"


def disk_full_message(output_dir, checkpoint):
    free = shutil.disk_usage(output_dir).free if os.path.isdir(output_dir) else 0
    return (f"no space left on {output_dir} ({gigabytes(free)} free) while saving {os.path.basename(checkpoint)}: "
            f"{FULL_SIZE_NEEDS}; the previous checkpoint is kept. Free some space (or use another --output_dir), "
            "then resume with --resume_from_checkpoint latest")


def checkpoint_bytes(models):
    """Estimated size of one checkpoint of a run training `models`: every state-dict tensor of each
    trained model (accelerate saves the whole prepared model: stage 2 its frozen spatial layers
    too) plus AdamW's two moments per trained parameter. Frozen models are not saved. SD1.5 size:
    stage 1 19.5 GB, stage 2 8.3 GB (GB = 2**30 bytes, as du counts)."""
    total = 0
    for model in models:
        trained = [p for p in model.parameters() if p.requires_grad]
        if trained:
            total += sum(t.numel() * t.element_size() for t in model.state_dict().values())
            total += 2 * sum(p.numel() * p.element_size() for p in trained)
    return total


def warn_if_low_disk(output_dir, models):
    """Warn (one line; returns it) when `output_dir`'s disk cannot hold the checkpoints a save needs:
    the previous checkpoint stays until the new one is complete, so two of them, less those already
    written there."""
    need = checkpoint_bytes(models)
    missing = max(1, 2 - len(list_checkpoints(output_dir)))
    free = shutil.disk_usage(output_dir).free
    if free >= missing * need:
        return None
    line = (f"warning: {output_dir} has {gigabytes(free)} free; a checkpoint of this run takes ~{gigabytes(need)} "
            f"and the previous one is kept until the next is complete, so {gigabytes(missing * need)} are needed: "
            "a save will run out of space")
    print(line)
    return line


def abandon_newer_checkpoints(output_dir, step):
    """Resuming from an older checkpoint: rename the newer ones so `latest` and pruning skip them."""
    for newer_step, path in list_checkpoints(output_dir):
        if newer_step > step:
            os.replace(path, f"{path}.abandoned-at-{step}")
            print(f"{path} is newer than the resumed checkpoint: renamed to {path}.abandoned-at-{step}")


def prune_checkpoints(output_dir, keep):
    """Delete the oldest complete checkpoints so at most `keep` remain, and any stale partial ones
    (the current save's own `.partial` is already renamed when this runs)."""
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name.endswith(".partial"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    found = list_checkpoints(output_dir)
    for _, path in found[:max(0, len(found) - max(keep, 0))]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint_models(path):
    """The model tensors of a checkpoint: a list of state dicts, in prepare order (the UNet, then
    BrushNet if the checkpoint holds it). A damaged or truncated file is a ValueError naming it."""
    if not os.path.isfile(os.path.join(path, MODEL_FILES[0])):
        raise FileNotFoundError(f"{path}: no {MODEL_FILES[0]} (a DeepSpeed checkpoint? convert it with "
                                "DeepSpeed's zero_to_fp32.py, or resume and let the run write final folders)")
    return [read_safetensors(os.path.join(path, name)) for name in MODEL_FILES
            if os.path.isfile(os.path.join(path, name))]


def read_safetensors(file):
    """`load_file(file)`; a file that is not whole (cut short by a crash or a full disk) is a
    ValueError naming it instead of safetensors' bare `incomplete metadata`."""
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own SafetensorError (no common base to catch)
        raise ValueError(unreadable(file, e)) from None


def unreadable(file, error):
    return (f"{file}: not a readable safetensors file ({error}); it was probably cut short "
            f"({os.path.getsize(file)} bytes): use another checkpoint")


# ----------------------------------------------------------------------------- resuming a run
def frozen_fingerprints(sources):
    """{name: {"path", "files"}} of the folders the frozen models came from (stage 2: BrushNet)."""
    return {name: {"path": os.path.abspath(path), "files": fingerprint(path)} for name, path in sources.items()}


def resume(accelerator, args, frozen=None):
    """Restore the state named by --resume_from_checkpoint; returns (step, data position) to continue
    from: the position as saved, [epoch, batches read in it], or None for a checkpoint without one.

    A checkpoint only holds the trained models: a frozen one is loaded again from its folder, so
    if that folder changed since the checkpoint was written (stage 2's BrushNet re-converted),
    the run stops instead of silently pairing the checkpoint with another model.
    """
    if not args.resume_from_checkpoint:
        return 0, None
    path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if path is None:
        accelerator.print(f"no checkpoint in {args.output_dir} yet: starting from step 0")
        return 0, None
    marker = read_marker(path)
    saved = marker.get("frozen_sources", {})
    for name, now in (frozen or {}).items():
        if name in saved and saved[name]["files"] != now["files"]:
            raise SystemExit(f"{path} was trained against the frozen {name} in {saved[name]['path']} as it was "
                             f"then; {now['path']} now holds different weights. Point the run at the "
                             f"{name} it was trained with, or start a new run (an output_dir without checkpoints).")
    accelerator.print(f"resuming from {path}")
    accelerator.load_state(path)
    for optimizer in accelerator._optimizers:
        optimizer_as_this_run(optimizer, path)
    step = checkpoint_step(path)
    in_this_run = os.path.samefile(os.path.dirname(os.path.abspath(path)), args.output_dir)
    if accelerator.is_main_process and in_this_run:  # an older one of this run: set the newer aside
        abandon_newer_checkpoints(args.output_dir, step)
    accelerator.wait_for_everyone()
    return step, marker.get("data_position")


def same_order(a, b):
    """True where a and b lay out their elements in the same memory order (the strides of size-1 dims,
    e.g. a 1x1 convolution's, do not matter)."""
    return all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def optimizer_as_this_run(optimizer, path):
    """After load_state: the checkpoint's values in this run's optimizer as this run configured it.

    torch's load_state_dict also takes the saved groups' kernel choices (fused, foreach, capturable):
    a run resumed under another --fused_adam would keep the old kernel (torch's foreach AdamW then
    refuses the folded clip's grad_scale), so they are put back, and each step count goes where the
    kernel reads it (the device for fused and capturable ones, else the host: a foreach AdamW would
    read each from the GPU). Each state tensor shaped as its parameter takes the parameter's memory
    order: a checkpoint saved under the other --channels_last (finetune_stage1.sh turned it on) holds
    Adam's moments in the old one, which the fused kernels refuse; values are kept. 8-bit states are
    quantized in blocks of memory order: those cannot move, so the run stops instead."""
    inner = getattr(optimizer, "optimizer", optimizer)
    defaults = getattr(inner, "defaults", {})  # DeepSpeed's optimizer keeps its own
    for group in inner.param_groups:
        group.update({k: defaults[k] for k in ("fused", "foreach", "capturable") if k in defaults})
        on_device = group.get("fused") or group.get("capturable")
        for param in group["params"]:
            state = inner.state.get(param, {})
            for key, value in list(state.items()):
                if key == "step" and torch.is_tensor(value) and "fused" in group:  # torch's AdamW
                    state[key] = value.to(param.device if on_device else "cpu", torch.float32)
                if not torch.is_tensor(value) or value.shape != param.shape or same_order(value, param):
                    continue
                if not value.is_floating_point():
                    raise SystemExit(f"{path}: its optimizer state ({key}) was saved with the other --channels_last "
                                     "than this run's; resume with the value the checkpoint was trained with.")
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def data_position(saved, step, steps_per_epoch, args, batches_per_epoch):
    """(epoch, batches of it already read) to go on from: the checkpoint's own record, else (one
    written before it was kept) derived from the step, which is exact unless updates were skipped."""
    epoch, read = saved or (step // steps_per_epoch, (step % steps_per_epoch) * args.gradient_accumulation_steps)
    return (epoch + 1, 0) if read >= batches_per_epoch else (epoch, read)
