import os

# Triton kernels run under the interpreter on machines without a GPU (CI), at small shapes.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
