"""
Which scaled-dot-product-attention kernel runs: SDPACalls records the shapes of a model's
F.scaled_dot_product_attention calls, probe_sdpa replays one on a device and reports the kernel SDPA picks
unrestricted and whether each backend (flash, memory-efficient, cuDNN, math) runs it alone
(torch.nn.attention.sdpa_kernel). gpu_report.py's "sdpa" rows.
"""
import re
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from errors import first_line

# aten op SDPA dispatches to -> kernel family (the CPU's flash kernel included)
SDPA_OPS = [("_scaled_dot_product_flash_attention", "flash"), ("_scaled_dot_product_efficient_attention", "efficient"),
            ("_scaled_dot_product_cudnn_attention", "cudnn"), ("_scaled_dot_product_attention_math", "math"),
            ("_scaled_dot_product_fused_attention_overrideable", "overrideable")]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


class SDPACalls(torch.overrides.TorchFunctionMode):
    """Records the shapes of every F.scaled_dot_product_attention call: (q, k, v, attn_mask or None)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            call = [list(a.shape) for a in args[:3]] + [None if mask is None else list(mask.shape)]
            if call not in self.calls:
                self.calls.append(call)
        return func(*args, **kwargs)


def probe_sdpa(shapes, batch, device, dtype, backward):
    """Which kernel SDPA picks unrestricted ('default', from the aten op the profiler sees) and, restricted to one
    backend at a time (torch.nn.attention.sdpa_kernel), whether it runs: 'ok' or 'no: <torch's reason>'."""
    q, k, v = (torch.randn([s[0] * batch, *s[1:]], device=device, dtype=dtype, requires_grad=backward)
               for s in shapes[:3])  # the batch-1 shapes' leading (batch x windows) dimension, scaled to the batch
    mask = None if shapes[3] is None else torch.randn(shapes[3], device=device, dtype=dtype)

    def call():
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if backward:
            o.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    ops = {e.key for e in prof.key_averages()}
    out["default"] = next((kind for op, kind in SDPA_OPS if any(op in n and "backward" not in n for n in ops)), None)
    for name, backend in BACKENDS.items():
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel(backend):
            warnings.simplefilter("always")
            try:
                call()
                out[name] = "ok"
            except RuntimeError as e:  # "No available kernel": the reasons come as warnings
                why = [re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(w.message)).strip()
                       for w in caught] or [first_line(e)]
                out[name] = "no: " + " ".join(w for w in dict.fromkeys(why) if w)[:400]
    return out
