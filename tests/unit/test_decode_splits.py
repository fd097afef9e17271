"""Split-K factor of decode steps (runner/cuda_graphs.decode_splits, attention/backend.choose_splits)."""
from tierserve.attention.backend import choose_splits
from tierserve.attention.select import SparseConfig, selection_bound
from tierserve.runner import cuda_graphs
from tierserve.runner.cuda_graphs import decode_splits


def test_splits_fill_the_gpu_without_tiny_splits():
    assert choose_splits(1, 8, 131072) == 64            # 8 programs per split: capped at 64 splits
    assert choose_splits(1, 8, 2048) == 8               # no split under 256 tokens
    assert choose_splits(64, 8, 131072) == 1 + (2 * 132 - 1) // 512
    assert choose_splits(1, 8, 100) == 1


def test_graph_buckets_share_the_eager_choice_and_sparse_can_size_by_the_selection(monkeypatch):
    # a batch of 3 takes its bucket's (4) factor, eager or in a graph
    assert decode_splits(3, 8, 131072, 16, 132) == choose_splits(4, 8, 131072, 132)
    cfg = SparseConfig("pages", 2048)
    monkeypatch.setattr(cuda_graphs, "SPARSE_SPLITS", "context")
    assert decode_splits(1, 8, 131072, 16, 132, cfg, 16) == 64
    monkeypatch.setattr(cuda_graphs, "SPARSE_SPLITS", "selection")
    bound = selection_bound(cfg, 16) * 16
    assert decode_splits(1, 8, 131072, 16, 132, cfg, 16) == choose_splits(1, 8, bound, 132) < 64
    assert decode_splits(1, 8, 131072, 16, 132, None, 16) == 64      # dense steps keep the context's
    assert decode_splits(1, 8, 1024, 16, 132, cfg, 16) == choose_splits(1, 8, 1024, 132)


def test_fp8_kv_steps_take_more_shorter_splits():
    """With FP8 KV the decode kernel holds fewer programs per SM, so its steps split into more, shorter pieces
    (fp8_decode_config.SPLITS): >= 64 tokens a split and up to 16 programs per SM; eager and graph steps alike."""
    from tierserve.attention.fp8_decode_config import SPLITS
    assert choose_splits(1, 8, 2048 + 144, 132, **SPLITS) == 35           # 2,192 tokens / 64
    assert choose_splits(1, 8, 2048 + 144, 132) == 9
    assert choose_splits(16, 8, 32768, 132, **SPLITS) == 17              # 16 * 132 programs over 128 rows
    assert decode_splits(1, 8, 2192, 16, 132, fp8=True) == 35
    assert decode_splits(3, 8, 131072, 16, 132, fp8=True) == choose_splits(4, 8, 131072, 132, **SPLITS) == 64
