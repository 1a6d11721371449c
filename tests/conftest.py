import os

# Two cores: inductor's compile-worker pool only competes with the test itself.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
