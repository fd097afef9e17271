import os

# Page accounting is checked after every engine step in every test.
os.environ.setdefault("TIERSERVE_DEBUG_INVARIANTS", "1")
