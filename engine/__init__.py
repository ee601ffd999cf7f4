"""Data engine: store layout, sampling, window reads, the augmentation
registry (engine/ops.py), the DALI pipeline with its two backends, and
make_loader tying them together (docs/architecture.md)."""


def __getattr__(name):
    # Lazy, so that `import engine.sampling` in a DALI worker or a preprocessing
    # process does not pull in DALI, torch and Kornia.
    if name == "make_loader":
        from engine.loader import make_loader
        return make_loader
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
