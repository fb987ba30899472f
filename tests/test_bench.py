"""The benchmarks run (tiny, on CPU) so they never rot; their numbers are not checked here."""
import json
import subprocess
import sys

from tests.test_train_e2e import REPO


def test_train_step_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench/train_step.py", "--tiny", "--steps", "1", "--warmup", "0",
                           "--configs", "s1-baseline,s1-default,s2-24GB@20", "--json", str(out), "--profile"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["config"] for r in results] == ["s1-baseline", "s1-default", "s2-24GB@20"]
    assert results[2]["options"]["memory_cap_gib"] == 20  # name@GiB: that configuration's own cap
    for r in results:
        assert r["median_s"] > 0 and r["tflop_per_step"] > 0 and r["trainable_params_M"] > 0
    assert results[0]["trainable_params_M"] > results[2]["trainable_params_M"]  # stage 2 trains motion only
    for r in results:  # every phase was seen, once per step (the named spans fit inside the forward)
        phases = r["phases_ms"]
        assert {"vae", "brushnet", "unet", "forward_other", "backward", "update"} <= phases.keys()
        assert all(phases[k] > 0 for k in ("vae", "brushnet", "unet", "backward", "update"))
        assert phases["forward_other"] >= 0
    assert "s1-default" in proc.stdout


def test_vae_encode_bench_tiny(tmp_path):
    out = tmp_path / "vae.json"
    proc = subprocess.run([sys.executable, "bench/vae_encode.py", "--tiny", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["norm_native_ms"] > 0 and r["encoder_by_channel_ms"] > 0
    assert r["norm_max_abs_diff"] < 1e-4 and r["encoder_max_abs_diff"] < 1e-4  # same numbers, fp32 on CPU


def test_train_step_bench_names_a_bad_configuration_before_running_any(capsys):
    import pytest

    sys.path.insert(0, str(REPO / "bench"))
    import train_step

    for bad, says in (("s1-default,nope", "no configuration 'nope'"), ("s1-default@22GiB", "memory cap in GiB")):
        with pytest.raises(SystemExit):
            train_step.main(["--tiny", "--configs", bad])
        assert says in capsys.readouterr().err


def test_attention_bench_tiny_records_the_steps_own_calls(tmp_path):
    """bench/attention.py reads each stage's attention calls off the real training step (meta device): stage 1
    has the VAE mid-block's one-head call without a gradient and, at every level, as many self- as cross-attention
    calls, all with a gradient; stage 2 adds the motion modules' attention over the frames and runs the frozen
    BrushNet's without one. Every kernel's time is taken, and the best is never slower than torch's choice."""
    out = tmp_path / "attention.json"
    proc = subprocess.run([sys.executable, "bench/attention.py", "--tiny", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    s1 = [r for r in results if r["stage"] == "stage1"]
    s2 = [r for r in results if r["stage"] == "stage2"]
    vae = [r for r in s1 if r["query"][1] == 1]
    assert len(vae) == 1 and vae[0]["calls"] == 1 and not vae[0]["grad"]
    rest = [r for r in s1 if r["query"][1] != 1]
    assert rest and all(r["grad"] for r in rest)
    for q in {tuple(r["query"]) for r in rest}:
        self_calls = sum(r["calls"] for r in rest if tuple(r["query"]) == q and r["key"][2] == q[2])
        cross_calls = sum(r["calls"] for r in rest if tuple(r["query"]) == q and r["key"][2] == 77)
        assert self_calls == cross_calls > 0, q
    frames = 2  # the tiny stage 2 clip
    assert any(r["query"][2] == frames and r["key"][2] == frames and r["grad"] for r in s2)  # motion modules
    assert any(not r["grad"] and r["key"][2] == 77 for r in s2)  # the frozen BrushNet
    for r in results:
        assert all(ms > 0 for ms in r["ms"].values()) and r["ms"][r["best"]] <= r["ms"]["torch"]
    assert "ms with the best per shape" in proc.stdout


def test_adamw_bench_tiny_checks_each_update_against_the_fused_one(tmp_path):
    out = tmp_path / "adamw.json"
    proc = subprocess.run([sys.executable, "bench/adamw.py", "--tensors", "4", "--reps", "1", "--variants",
                           "fused,fused_flat,compiled_flat", "--json", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["tensors"] == 4 and list(r["results"]) == ["fused", "fused_flat", "compiled_flat"]
    assert r["results"]["fused_flat"]["max_abs_diff_vs_fused"] == 0  # the same kernel, flat
    assert r["results"]["compiled_flat"]["max_abs_diff_vs_fused"] < 1e-5  # the same update, rounding apart
