"""AdamW in one kernel launch over every parameter (`--fused_adam 2`, opt-in).

torch's fused AdamW walks the parameter list in many launches of fixed-size chunks; alone on an H200
it moved 2.56 TB/s for stage 1's 1.75 B parameters, where one pointwise kernel over flat tensors moved
4.24 TB/s (run 30, bench/adamw.py). This kernel keeps the parameters where they are: a table of each
tensor's addresses lets one launch cover all of them, a block of elements per program.

The state is torch.optim.AdamW's (exp_avg, exp_avg_sq, a float32 step per parameter on its device),
so checkpoints move freely between this and torch's AdamW, and the loss scaler's grad_scale/found_inf
are read as torch's fused AdamW reads them (speed.fused_clip_step).
"""
import os

import torch
import triton
import triton.language as tl

from diffueraser.checkpoints import same_order

BLOCK = 4096  # elements per program
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # at import: the kernels run on CPU tensors (tests)


@triton.jit
def update(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, scale, step_size, bc2_sqrt, lr_wd, beta1, rest1, beta2, rest2, eps):
    """AdamW on the elements at offs, as torch's fused kernel: decoupled decay, the gradient divided by the
    loss scale (and the clip coefficient, speed.fused_clip_step), bias-corrected moments. rest1/rest2 are
    1 - beta1/beta2 taken on the host (in fp32, 1 - 0.999 would lose 1.3e-5); square root and division
    correctly rounded, as in torch's CUDA kernel."""
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.div_rn(tl.load(g_ptr + offs, mask=mask), scale)
    m = beta1 * tl.load(m_ptr + offs, mask=mask) + rest1 * g
    v = beta2 * tl.load(v_ptr + offs, mask=mask) + rest2 * g * g
    p = p - lr_wd * p - tl.div_rn(step_size * m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)

@triton.jit
def adamw_blocks(block_tensor, block_start, addrs, numels, coefs, flags, lr_wd, beta1, rest1, beta2, rest2, eps,
                 BLOCK: tl.constexpr):
    """One block of one tensor: addrs holds (weight, gradient, exp_avg, exp_avg_sq) per tensor, each
    16-byte aligned; coefs (step size, sqrt of the second bias correction) per tensor; flags
    (found_inf, grad scale). Whole blocks load without a mask, so in 16-byte vectors."""
    b = tl.program_id(0)
    if tl.load(flags) == 0:  # found_inf: nothing changes
        t = tl.load(block_tensor + b)
        start = tl.multiple_of(tl.load(block_start + b), BLOCK)
        n = tl.load(numels + t)
        args = (tl.load(flags + 1), tl.load(coefs + 2 * t), tl.load(coefs + 2 * t + 1), lr_wd, beta1, rest1, beta2,
                rest2, eps)
        p = tl.multiple_of(tl.load(addrs + 4 * t).to(tl.pointer_type(tl.float32)), 16)
        g = tl.multiple_of(tl.load(addrs + 4 * t + 1).to(tl.pointer_type(tl.float32)), 16)
        m = tl.multiple_of(tl.load(addrs + 4 * t + 2).to(tl.pointer_type(tl.float32)), 16)
        v = tl.multiple_of(tl.load(addrs + 4 * t + 3).to(tl.pointer_type(tl.float32)), 16)
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:
            update(p, g, m, v, offs, None, *args)
        else:
            update(p, g, m, v, offs, offs < n, *args)


def to_device(values, device):
    """A host list as an int64 tensor on the device, copied without waiting for the GPU."""
    return torch.tensor(values, dtype=torch.int64, pin_memory=device.type == "cuda").to(device, non_blocking=True)


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose step is one Triton launch per parameter group (fp32 parameters with
    gradients and moments in the parameter's memory layout, e.g. channels-last convolutions)."""

    folds_clip = True  # takes grad_scale / found_inf as torch's fused AdamW does

    def __init__(self, params, device, **kwargs):
        if torch.device(device).type != "cuda" and not INTERPRETED:
            raise SystemExit("--fused_adam 2: the Triton AdamW needs a CUDA GPU; use --fused_adam 1")
        # capturable: a loaded checkpoint's steps stay float32 tensors on the parameters' device
        super().__init__(params, capturable=True, **kwargs)
        self._tables = {}  # group index -> (addresses the table was built from, device tables)

    def _table(self, i, params):
        """Per-tensor addresses and sizes, per-block (tensor, start), on the device. The addresses are
        rebuilt when a tensor moved (a new gradient each step without the CUDA graph, moments parked in
        host memory and back), the blocks only when the sizes changed; neither waits for the GPU."""
        tensors = [(p, p.grad, self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"]) for p in params]
        key = ([t.data_ptr() for row in tensors for t in row], [(p.numel(), p.stride()) for p in params])
        cached = self._tables.get(i)
        if cached and cached[0] == key:
            return cached[1]
        for j, (p, *others) in enumerate(tensors):
            if p.dtype != torch.float32 or any(t.dtype != torch.float32 or not same_order(t, p) for t in others):
                raise ValueError(f"--fused_adam 2: parameter {j} of group {i} ({tuple(p.shape)}, {p.dtype}) needs "
                                 "float32 gradient and moments in its own memory layout; use --fused_adam 1")
            if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
                raise ValueError(f"--fused_adam 2: parameter {j} of group {i} is not dense in memory")
        if any(a % 16 for a in key[0]):  # the kernel loads whole blocks in 16-byte vectors
            raise ValueError("--fused_adam 2: a parameter, gradient or moment is not 16-byte aligned; use --fused_adam 1")
        dev = params[0].device
        sizes = [n for n, _ in key[1]]
        if cached and [n for n, _ in cached[0][1]] == sizes:
            table = dict(cached[1])
        else:
            counts = [(n + BLOCK - 1) // BLOCK for n in sizes]  # blocks per tensor
            numels, counts_t = (to_device(x, dev) for x in (sizes, counts))
            block_tensor = torch.repeat_interleave(torch.arange(len(sizes), device=dev), counts_t, output_size=sum(counts))
            first = torch.cumsum(counts_t, 0) - counts_t  # each tensor's first block
            block_start = (torch.arange(sum(counts), device=dev) - first[block_tensor]) * BLOCK
            table = dict(block_tensor=block_tensor.int(), block_start=block_start, numels=numels)
        table["addrs"] = to_device(key[0], dev)
        self._tables[i] = (key, table)
        return table

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for i, group in enumerate(self.param_groups):
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("--fused_adam 2: amsgrad and maximize are not supported")
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            dev = params[0].device
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=dev)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != dev:  # a state loaded on the host (resume() puts it here itself)
                    state["step"] = state["step"].to(dev, torch.float32)
            inf = found_inf.to(dev, torch.float32) if found_inf is not None else torch.zeros((), device=dev)
            scale = grad_scale.to(dev, torch.float32) if grad_scale is not None else torch.ones((), device=dev)
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1 - inf)  # a skipped update does not count, as in torch's fused AdamW
            (beta1, beta2), lr = group["betas"], float(group["lr"])
            t = torch.stack(steps).double()
            coefs = torch.stack([lr / (1 - beta1 ** t), (1 - beta2 ** t).sqrt()], 1).float()  # (T, 2)
            table = self._table(i, params)
            n_blocks = table["block_tensor"].numel()
            adamw_blocks[(n_blocks,)](table["block_tensor"], table["block_start"], table["addrs"], table["numels"],
                                      coefs, torch.stack([inf, scale]), lr * group["weight_decay"], beta1,
                                      1 - beta1, beta2, 1 - beta2, group["eps"], BLOCK=BLOCK)
        return loss
