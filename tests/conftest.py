import os

# Page accounting is checked after every engine step in every test.
os.environ.setdefault("TIERSERVE_DEBUG_INVARIANTS", "1")

try:
    import torch

    if not torch.cuda.is_available():
        # Triton kernels run on the CPU through the interpreter (tiny sizes only).
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
