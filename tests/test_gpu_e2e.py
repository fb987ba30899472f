"""The users' path end to end (bench/gpu_e2e.py --tiny): both shell scripts in bf16 with
validation, 4 loader workers and LATENT_CACHE, stage 1 compiled, a SIGTERM stop and a resume from the run's own compile
cache, both converters. Before the BrushNetOutput fix every stage-1 validation here failed."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_end_to_end_through_the_scripts(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_e2e.py", str(tmp_path), "--tiny"], cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0 and "all steps passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
    figures = dict(json.loads((tmp_path / "e2e_report.json").read_text())["figures"])
    assert figures["stage 1 validation GIFs (step: count)"] == "0: 2, 25: 2, 50: 2, 60: 2"  # 60: the end-of-run one
    assert figures["stage 2 validation GIFs (step: count)"] == "0: 2, 3: 2"
    # the scripts' latent cache: built by stage 1's first start, read by its resume and by stage 2
    (built, _, read0), (again, _, read1) = [map(int, run.split(", ")) for run in
                                            figures["stage 1 latent cache (videos encoded, s, read)"].split(" ; ")]
    encoded2, _, read2 = map(int, figures["stage 2 latent cache (videos encoded, s, read)"].split(", "))
    assert built > 0 and (read0, again, encoded2) == (0, 0, 0) and read1 == read2 == built
    stage1 = tmp_path / "finetune-stage1"
    info = json.loads((stage1 / "run_info.json").read_text())
    assert info["compile"] is True and info["mixed_precision"] == "bf16" and info["dataloader_num_workers"] == 4
    assert any((stage1 / "compile_cache").rglob("*")), "the compiled run left no cache beside its checkpoints"
    log = (stage1 / "train_stage1.log").read_text(errors="replace")
    assert "stopped at step" in log and "resuming from" in log
    for stage in ("stage1", "stage2"):
        for name in ("unet_main", "brushnet"):
            assert (tmp_path / "converted" / stage / name / "diffusion_pytorch_model.safetensors").is_file()
