"""Two-level exact top-k (attention/triton_select_two_level.py; each step's cut by the search or a bitonic top-k) vs
the one-level kernel it may replace (triton_select_topk.topk_compact, itself checked against a stable sort): the same
pages, order, lengths and heat, on random scores with many ties, +inf and -inf pages (interpreter on the CPU, tiny
sizes)."""
import pytest
import torch

from tierserve.attention.select import SparseConfig
from tierserve.attention.triton_select import page_scores
from tierserve.attention.triton_select_topk import topk_compact
from tierserve.attention.triton_select_two_level import group_capacity, group_size, sort_sizes, topk_two_level

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _scores(P, seed, B=2, H=3):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, H, P, generator=g) * 10.0 ** torch.randint(-3, 4, (B, H, P), generator=g).float()
    s[:, :, ::7] = s[:, :, 3:4]                          # many equal scores
    s[:, :, 5::11], s[:, :, 6::13] = 0.0, -0.0
    s[:, :, :2] = float("inf")                           # always kept (sink)
    s[:, :, -3:] = float("inf")                          # always kept (recent)
    return s


@pytest.mark.parametrize("group,threshold", [(2, "search"), (4, "search"), (16, "search"), (4, "sort"), (16, "sort")])
@pytest.mark.parametrize("P,budget", [(37, 9), (300, 64), (1000, 128), (64, 64), (50, 80), (9, 3)])
def test_two_level_selects_what_one_level_does(P, budget, group, threshold, B=2, H=3):
    page = 4
    scores = _scores(P, P + group, B, H)
    seq = torch.tensor([P * page, P * page * 2 // 3 + 1])[:B]
    n_vis = (seq - 1) // page + 1
    scores[1:, :, int(n_vis[-1]):] = float("-inf")         # past the sequence: invisible
    S = -(-P // group)
    pad = torch.full((B, H, S * group - P), float("-inf"))
    groups = torch.cat([scores, pad], 2).view(B, H, S, group).amax(-1)
    table = torch.randperm(4 * P, generator=torch.Generator().manual_seed(1))[:P].repeat(B, 1)
    bound = budget + 8
    out = {}
    for name in ("one", "two"):
        heat = torch.zeros(4 * P, device=DEV)
        args = (table.to(DEV), seq.to(DEV), page, budget, bound, heat)
        if name == "one":
            r = topk_compact(scores.to(DEV), *args, num_device_pages=4 * P)
        else:
            r = topk_two_level(scores.to(DEV), groups.to(DEV), group, *args, num_device_pages=4 * P,
                               threshold=threshold)
        out[name] = [x.cpu() for x in r] + [heat.cpu()]
    for a, b in zip(out["one"], out["two"]):
        assert torch.equal(a, b)


def test_group_row_past_4096_lanes():
    """An engine at 1M tokens: a table just past 65,536 pages, 16-page groups in an 8192-lane group row (stop 21:
    this case ran the one-level streaming kernel, 519 us a layer on the H200)."""
    P = 65600
    G = group_size(P, 142)                       # the loose capacity of stop 21: 16-page groups
    assert G == 16 and -(-P // G) > 4096
    test_two_level_selects_what_one_level_does(P, 128, G, "sort", B=1, H=1)


def test_score_kernel_writes_group_maxima():
    torch.manual_seed(0)
    B, hq, hkv, D, page, P = 2, 4, 2, 16, 4, 23
    N = B * P + 1
    kv = torch.randn(N, 2, page + 1, hkv, D)
    kv[:, 0, page], kv[:, 1, page] = kv[:, 0, :page].amin(1), kv[:, 0, :page].amax(1)
    table = torch.randperm(N - 1)[:B * P].view(B, P) + 1
    seq = torch.tensor([P * page, 40])
    q = torch.randn(B, hq, D)
    cfg = SparseConfig("pages", topk_tokens=24, sink_tokens=4, recent_tokens=8)
    plain = page_scores(q.to(DEV), kv.to(DEV), table.to(DEV), seq.to(DEV), page, cfg)
    s, grp = page_scores(q.to(DEV), kv.to(DEV), table.to(DEV), seq.to(DEV), page, cfg, group=4)
    assert torch.equal(s, plain)
    pad = torch.full((B, hkv, 24 - P), float("-inf"), device=DEV)
    assert torch.equal(grp, torch.cat([s, pad], 2).view(B, hkv, 6, 4).amax(-1))


def test_group_size_keeps_both_rows_in_registers():
    # the engine's tables (context + 256 new tokens, 16-token pages; budget 128 of 135 pages): fewest lanes
    assert group_size(8208, 135, 128) == 8 and group_size(16384, 135, 128) == 8     # 128k / 256k tokens
    assert group_size(1000, 135, 128) == 4
    assert group_size(65536, 135, 128) == 16                                         # 1M tokens exactly
    assert group_size(65552, 135, 128) == 32 and group_size(131073, 142, 128) == 32  # 1M + new tokens, 2M
    assert group_size(262145, 142, 128) == 0                                         # past 4M: one-level kernel
    assert group_size(1 << 20, 135) == 0
    assert group_size(1000, 135, 128, max_groups=64) == 16
    assert group_capacity(135, 128) == 128 and group_capacity(135, 3) == 256 and group_capacity(20, 4) == 16


@pytest.mark.parametrize("P,budget,bound", [(300, 3, 40), (64, 30, 40), (200, 33, 41)])
def test_tight_capacity_holds_every_chosen_group(P, budget, bound):
    """Step 1 keeps at most max(budget, +inf groups) groups (``group_capacity``): budgets below, at and just past
    a power of two, +inf pages more numerous than the budget, against the one-level kernel."""
    page, B, H = 4, 2, 2
    scores = _scores(P, P + budget, B, H)
    scores[:, :, 40:40 + (bound - budget) - 5] = float("inf")      # up to bound - budget always-kept pages
    seq = torch.tensor([P * page, P * page // 2 + 3])
    n_vis = (seq - 1) // page + 1
    scores[1:, :, int(n_vis[-1]):] = float("-inf")
    for group in (2, 8):
        S = -(-P // group)
        pad = torch.full((B, H, S * group - P), float("-inf"))
        groups = torch.cat([scores, pad], 2).view(B, H, S, group).amax(-1)
        table = torch.randperm(4 * P, generator=torch.Generator().manual_seed(2))[:P].repeat(B, 1)
        out = []
        for fn in (topk_compact, lambda s, *a, **k: topk_two_level(s, groups.to(DEV), group, *a, **k)):
            heat = torch.zeros(4 * P, device=DEV)
            r = fn(scores.to(DEV), table.to(DEV), seq.to(DEV), page, budget, bound, heat, num_device_pages=4 * P)
            out.append([x.cpu() for x in r] + [heat.cpu()])
        for a, b in zip(*out):
            assert torch.equal(a, b)


def test_sort_sizes_pick_the_bitonic_top_k_where_it_fits():
    """The "sort" cases above really sort (a step searches only where the budget's power of two exceeds its lanes)."""
    assert sort_sizes("sort", 64, 128, 256) == (64, 64)          # P=300, budget 64, 4-page groups
    assert sort_sizes("sort", 9, 4, 64) == (0, 16)               # P=37, 16-page groups: 3 groups in 4 lanes
    assert sort_sizes("sort", 128, 8192, 4096) == (128, 128)     # the 1M table
    assert sort_sizes("search", 64, 128, 256) == (0, 0)
    assert sort_sizes("auto", 32, 512, 512) == (32, 32)            # 64-token pages at 128k: sorts (stop 26)
    assert sort_sizes("auto", 128, 1024, 2048) == (0, 0)           # 16-token pages at 128k: searches
    with pytest.raises(ValueError, match="threshold must be"):
        sort_sizes("radix", 64, 128, 256)
