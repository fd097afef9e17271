"""``--load-format dummy`` for DeepSeek-V4: the model at the config's shapes with random weights."""
from __future__ import annotations

import os

import torch


def random_deepseek_v4(cfg, seed: int, dtype: torch.dtype, device: torch.device):
    """``--load-format dummy``: a DeepSeek-V4 at the config's shapes with random weights (matrices
    N(0, 0.02), norms and mHC scales 1, other vectors 0, a random hash-routing table), built directly
    at the final dtypes. Refuses a model whose weights do not fit in the free memory of ``device``."""
    from tierserve.models.deepseek_v4 import DeepseekV4Model

    with torch.device("meta"):
        model = DeepseekV4Model(cfg)
    if dtype != torch.float32:
        model.cast(dtype)
    need = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    free = free_bytes(device)
    if free is not None and need > 0.9 * free:
        raise ValueError(f"--load-format dummy: this DeepSeek-V4 config needs {need / 2**30:.1f} GiB of weights "
                         f"in {dtype}, but only {free / 2**30:.1f} GiB are free on {device}")
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".scale"):
                p.fill_(1.0)
            elif p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.zero_()
        for name, b in model.named_buffers():
            if not name.endswith("tid2eid"):
                raise ValueError(f"--load-format dummy: no random init for the DeepSeek-V4 buffer {name!r}")
            vocab, k = b.shape        # k distinct experts per token id
            b.copy_(torch.rand(vocab, cfg.n_routed_experts, generator=g, device=device).argsort(-1)[:, :k])
    return model.eval()


def free_bytes(device: torch.device) -> int | None:
    """Free bytes on ``device`` now (CUDA: free device memory; CPU: available RAM), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
