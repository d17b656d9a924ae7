"""The device-specific implementations behind gpucnn.backend.ops_for(xp).

``cpu``: NumPy, with the batch work shared out between gpucnn's threads.
``cuda``: CuPy (or the module playing it), with the hand-written kernels of kernels/*.cu.
Both give the same small interface (BackendOps); gpucnn.functional holds the
equations and calls it, and never asks which device it is on.
"""
