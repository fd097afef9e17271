"""``--load-format dummy`` for DeepSeek-V4: the model at the config's shapes with random weights."""
from __future__ import annotations

import os

import torch


def random_deepseek_v4(cfg, seed: int, dtype: torch.dtype, device: torch.device, host_experts: bool = False):
    """``--load-format dummy``: a DeepSeek-V4 at the config's shapes with random weights (matrices
    N(0, 0.02), norms and mHC scales 1, other vectors 0, a random hash-routing table), built directly
    at the final dtypes. Refuses a model whose weights do not fit in the free memory of ``device``.

    ``host_experts`` (``--cpu-experts``): the routed experts' weights are allocated in CPU RAM (page-locked
    when ``device`` is CUDA) and everything else on ``device``; their random values are still drawn on
    ``device`` a matrix at a time and copied down (CPU sampling runs at ~0.13 G values/s: minutes for a
    V4-Flash's experts), so they differ from an all-device build of the same seed."""
    from tierserve.models.deepseek_v4 import DeepseekV4Model

    with torch.device("meta"):
        model = DeepseekV4Model(cfg)
    if dtype != torch.float32:
        model.cast(dtype)
    on_host = (lambda name: host_experts and ".ffn.experts." in f".{name}")
    tensors = [*model.named_parameters(), *model.named_buffers()]
    need = {h: sum(t.numel() * t.element_size() for n, t in tensors if on_host(n) == h) for h in (False, True)}
    for where, nbytes in ((device, need[False]), (torch.device("cpu"), need[True])):
        free = free_bytes(where)
        if nbytes and free is not None and nbytes > 0.9 * free:
            raise ValueError(f"--load-format dummy: this DeepSeek-V4 config needs {nbytes / 2**30:.1f} GiB of "
                             f"weights in {dtype} on {where}, but only {free / 2**30:.1f} GiB are free there")
    pin = device.type == "cuda"
    for mname, mod in model.named_modules():
        for k, t in mod._parameters.items():
            if t is not None:
                name = f"{mname}.{k}" if mname else k
                data = (torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) if on_host(name)
                        else torch.empty(t.shape, dtype=t.dtype, device=device))
                mod._parameters[k] = torch.nn.Parameter(data, requires_grad=False)
        for k, t in mod._buffers.items():
            if t is not None:
                mod._buffers[k] = torch.empty(t.shape, dtype=t.dtype, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".scale"):
                p.fill_(1.0)
            elif p.dim() > 1:
                if p.device.type == device.type:
                    p.normal_(0.0, 0.02, generator=g)
                else:                                   # a host expert: drawn on the device, copied down
                    p.copy_(torch.empty(p.shape, dtype=p.dtype, device=device).normal_(0.0, 0.02, generator=g))
            else:
                p.zero_()
        for name, b in model.named_buffers():
            if not name.endswith("tid2eid"):
                raise ValueError(f"--load-format dummy: no random init for the DeepSeek-V4 buffer {name!r}")
            vocab, k = b.shape        # k distinct experts per token id
            b.copy_(torch.rand(vocab, cfg.n_routed_experts, generator=g, device=device).argsort(-1)[:, :k])
    return model.eval()


def free_bytes(device: torch.device) -> int | None:
    """Free bytes on ``device`` now (CUDA: free device memory; CPU: MemAvailable, which counts the page cache
    the kernel can drop, else free RAM), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
