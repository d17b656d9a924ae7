"""Compile CUDA source with NVRTC, the compiler CuPy uses, without a GPU or driver.

Used by ``gpucnn info`` and the tests to prove that every kernel file compiles
for every instantiation the loader asks for, and by ``gpucnn info --kernels``
(kernel_report.py) for the machine code (cubin) of a real architecture. NVRTC is found in the
nvidia-cuda-nvrtc wheel, under CUDA_HOME / CUDA_PATH, or on the loader path.
"""
import ctypes
import ctypes.util
import glob
import os

_lib = None


def _candidates():
    try:
        import nvidia.cuda_nvrtc as pkg
        for base in pkg.__path__:
            yield from sorted(glob.glob(os.path.join(base, "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    try:  # the CUDA 13 wheels put every library under nvidia/cu13
        import nvidia
        for base in nvidia.__path__:
            yield from sorted(glob.glob(os.path.join(base, "cu1*", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            yield from sorted(glob.glob(os.path.join(os.environ[var], "lib64", "libnvrtc.so*")))
    yield from sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
    found = ctypes.util.find_library("nvrtc")
    if found:
        yield found


def library():
    """The loaded NVRTC library, or None where none is installed."""
    global _lib
    if _lib is None:
        for path in _candidates():
            if "builtins" in os.path.basename(path) or ".alt." in os.path.basename(path):
                continue
            try:
                _lib = ctypes.CDLL(path)
                break
            except OSError:
                continue
    return _lib


def version():
    lib = library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile(code, name_expressions, arch="compute_90", options=(), filename="kernel.cu"):
    """Compile to PTX. Returns (ok, log, lowered_names): lowered_names maps each
    name expression to its mangled symbol, proving the instantiation exists."""
    ok, log, lowered, _ = _compile(code, name_expressions, arch, options, filename, cubin=False)
    return ok, log, lowered


def compile_cubin(code, name_expressions, arch="sm_90", options=(), filename="kernel.cu"):
    """Compile to machine code for a real architecture (arch "sm_XX"). Returns
    (ok, log, lowered_names, cubin): cubin is the ELF image's bytes, None on failure.
    Pass "--ptxas-options=-v" in options for ptxas's resource usage in the log."""
    if not arch.startswith("sm_"):
        raise ValueError(f"arch must be a real architecture such as 'sm_90' for a cubin, "
                         f"got {arch!r}")
    return _compile(code, name_expressions, arch, options, filename, cubin=True)


def _compile(code, name_expressions, arch, options, filename, cubin):
    lib = library()
    if lib is None:
        raise RuntimeError("NVRTC is not installed: pip install nvidia-cuda-nvrtc-cu12")
    prog = ctypes.c_void_p()
    check = _checker(lib)
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), filename.encode(), 0,
                                 None, None), "nvrtcCreateProgram")
    try:
        for name in name_expressions:
            check(lib.nvrtcAddNameExpression(prog, name.encode()), "nvrtcAddNameExpression")
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        argv = (ctypes.c_char_p * len(opts))(*opts)
        result = lib.nvrtcCompileProgram(prog, len(opts), argv)
        size = ctypes.c_size_t()
        check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        buf = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.value.decode(errors="replace")
        lowered, image = {}, None
        if result == 0:
            for name in name_expressions:
                out = ctypes.c_char_p()
                check(lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)),
                      "nvrtcGetLoweredName")
                lowered[name] = out.value.decode()
            if cubin:
                check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
                buf = ctypes.create_string_buffer(size.value)
                check(lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
                image = buf.raw
        return result == 0, log, lowered, image
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _checker(lib):
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed: {lib.nvrtcGetErrorString(status).decode()}")
    return check
