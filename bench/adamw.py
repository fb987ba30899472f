"""The AdamW update of stage 1 (UNet + BrushNet, 1.75 B fp32 parameters) alone, by kernel, with the
GPU's copy bandwidth measured in the same run as the ceiling.

    python bench/adamw.py --json adamw.json           # on a GPU: every variant, ms and TB/s
    python bench/adamw.py --stage 2                   # the motion modules' update (stage 2)

Variants, each from the same weights, gradients and moments:
  fused            torch's fused AdamW over the parameter list, with grad_scale/found_inf (the scripts' update)
  fused_flat       the same kernel over one flat tensor of as many elements (what the list layout costs)
  compiled_flat    one torch.compile'd pointwise AdamW over flat tensors (what a flat layout could reach)
  compiled_foreach torch.compile'd _foreach_ ops over the parameter list (horizontally fused kernels)
  copy             a flat fp32 copy, read + write (the bandwidth ceiling, same run)

An update moves 28 bytes per parameter (reads weight, gradient and both moments; writes weight and
moments). Each variant's first step is checked against the fused one's (max abs difference).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LR, B1, B2, EPS, WD = 5e-6, 0.9, 0.999, 1e-8, 1e-2


def shapes(stage):
    from diffueraser.tiny import SD15_UNET
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_2d_condition import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        if stage == 1:
            return [p.shape for m in (unet, BrushNetModel.from_unet(unet)) for p in m.parameters()]
        from libs.unet_motion_model import MotionAdapter
        return [p.shape for p in MotionAdapter().parameters()]  # v1-5-2's layout, as tiny.py's "full"


def adamw_flat(p, g, m, v, step, scale, found_inf):
    """One AdamW step as torch's fused kernel does it (decoupled decay, gradient divided by scale,
    no update where found_inf): a pure function of flat tensors."""
    g = g / scale
    keep = found_inf > 0
    m2 = torch.lerp(m, g, 1 - B1)
    v2 = v * B2 + (1 - B2) * g * g
    bc1, bc2 = 1 - B1 ** step, 1 - B2 ** step
    p2 = p * (1 - LR * WD) - (LR / bc1) * m2 / (v2.sqrt() / bc2.sqrt() + EPS)
    return torch.where(keep, p, p2), torch.where(keep, m, m2), torch.where(keep, v, v2)


def adamw_flat_(p, g, m, v, step, scale, found_inf):
    """adamw_flat written into its inputs (compiled: one kernel, the copies fused into it)."""
    p2, m2, v2 = adamw_flat(p, g, m, v, step, scale, found_inf)
    p.copy_(p2), m.copy_(m2), v.copy_(v2)


def adamw_foreach(ps, gs, ms, vs, step, scale, found_inf):
    """The same over lists with _foreach_ ops, in place (for torch.compile's horizontal fusion)."""
    keep = found_inf > 0
    bc1, bc2 = 1 - B1 ** step, 1 - B2 ** step
    gs = torch._foreach_div(gs, scale)
    m2 = torch._foreach_lerp(ms, gs, 1 - B1)
    v2 = torch._foreach_add(torch._foreach_mul(vs, B2), torch._foreach_mul(torch._foreach_mul(gs, gs), 1 - B2))
    denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(v2), bc2.sqrt()), EPS)
    upd = torch._foreach_mul(torch._foreach_div(m2, denom), LR / bc1)
    p2 = torch._foreach_sub(torch._foreach_mul(ps, 1 - LR * WD), upd)
    for dst, new in ((ps, p2), (ms, m2), (vs, v2)):
        torch._foreach_copy_(dst, [torch.where(keep, d, n) for d, n in zip(dst, new)])


def timed(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # a CPU check of the script itself
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) * 1e3 / reps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--variants", default="fused,fused_flat,compiled_flat,copy")
    parser.add_argument("--tensors", type=int, default=0, help="only the first N tensors (a quick CPU check)")
    parser.add_argument("--json")
    args = parser.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = [s.numel() for s in shapes(args.stage)][: args.tensors or None]
    n = sum(sizes)
    print(f"stage {args.stage}: {len(sizes)} tensors, {n / 1e9:.3f} B parameters", flush=True)
    gen = torch.Generator(dev).manual_seed(0)
    flat = {k: torch.empty(n, device=dev) for k in ("p", "g", "m", "v")}
    for k in flat:
        flat[k].normal_(generator=gen)
    flat["v"].abs_()
    flat["g"].mul_(0.01)
    scale, found_inf = torch.full((), 2.0, device=dev), torch.zeros((), device=dev)
    step = torch.ones((), device=dev)
    results, first = {}, {}
    opt = ps = lists = fn = None

    def views(t):
        return [x.view(-1) for x in t.split(sizes)]

    def fresh():  # the variant's own copies, so every one starts from the same values
        return {k: t.clone() for k, t in flat.items()}

    for variant in args.variants.split(","):
        t0 = time.time()
        if variant == "copy":
            a, b = torch.empty(n, device=dev), flat["p"]
            ms = timed(lambda: a.copy_(b), args.reps, 2)
            results[variant] = dict(ms=ms, tb_s=8 * n / ms / 1e9)
            print(f"{variant:18s} {ms:7.2f} ms  {results[variant]['tb_s']:.2f} TB/s (read + write)", flush=True)
            del a
            continue
        listed = variant == "fused"  # one allocation per tensor, as a model's parameters
        s = {k: [x.clone() for x in views(t)] for k, t in flat.items()} if listed else fresh()
        if variant in ("fused", "fused_flat"):
            ps = [torch.nn.Parameter(x) for x in (s["p"] if listed else [s["p"]])]
            for p, g in zip(ps, s["g"] if listed else [s["g"]]):
                p.grad = g
            opt = torch.optim.AdamW(ps, fused=True, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
            saved = [p.detach().clone() for p in ps]
            opt.step()  # creates the state, then the state and weights are set back to the shared start
            for p, m, v, w in zip(ps, s["m"] if listed else [s["m"]], s["v"] if listed else [s["v"]], saved):
                opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"] = m, v
                opt.state[p]["step"].zero_()
                p.detach().copy_(w)
            del saved
            opt.grad_scale, opt.found_inf = scale, found_inf

            def run():
                opt.step()
            run()
            first[variant] = torch.cat([p.detach().view(-1) for p in ps])
        elif variant == "compiled_flat":
            fn = torch.compile(adamw_flat_)

            def run():
                fn(s["p"], s["g"], s["m"], s["v"], step, scale, found_inf)
            run()
            first[variant] = s["p"].clone()
        elif variant == "compiled_foreach":
            lists = [views(s[k]) for k in ("p", "g", "m", "v")]
            fn = torch.compile(adamw_foreach)

            def run():
                fn(*lists, step, scale, found_inf)
            run()
            first[variant] = s["p"].clone()
        else:
            parser.error(f"--variants: no variant {variant!r}")
        if dev == "cuda":
            torch.cuda.synchronize()
        compile_s = time.time() - t0
        ms = timed(run, args.reps, 2)
        diff = (first[variant] - first["fused"]).abs().max().item() if "fused" in first else float("nan")
        results[variant] = dict(ms=ms, tb_s=28 * n / ms / 1e9, first_step_s=compile_s, max_abs_diff_vs_fused=diff)
        print(f"{variant:18s} {ms:7.2f} ms  {results[variant]['tb_s']:.2f} TB/s  first call {compile_s:.0f} s  "
              f"max |diff| vs fused {diff:.3g}", flush=True)
        s = run = opt = ps = lists = fn = None  # free this variant's copies before the next
        if dev == "cuda":
            torch.cuda.empty_cache()
    if "fused" in results:
        for k, r in results.items():
            print(f"{k:18s} {results['fused']['ms'] / r['ms']:.2f}x the fused list")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(stage=args.stage, tensors=len(sizes), parameters=n, gpu=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                           torch=torch.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    main()
