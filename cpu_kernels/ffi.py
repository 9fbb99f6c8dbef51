"""numba <-> XLA typed FFI plumbing: read an `XLA_FFI_CallFrame` from a numba `cfunc`, register it.

A handler is `cfunc(voidptr(voidptr))`: it receives the call frame and returns an `XLA_FFI_Error*`
(NULL for success). The structs are read as arrays of 64-bit words at the offsets of
`xla/ffi/api/c_api.h` (x86-64 / aarch64 LP64 layout), which is a stable binary interface:

    XLA_FFI_CallFrame  words: 0 struct_size, 1 extension_start, 2 api, 3 ctx, 4 stage (int32),
                              5-9 args {struct_size, ext, size, types, args},
                              10-14 rets {struct_size, ext, size, types, rets}, ...
    XLA_FFI_Buffer     words: 0 struct_size, 1 ext, 2 dtype (int32), 3 data, 4 rank, 5 dims

When XLA registers a handler it first calls it with a metadata extension in `extension_start`,
asking which FFI API version the handler was built against; `call_frame` answers with the version of
the header shipped in jaxlib (`jax.ffi.include_dir()`) and tells the handler there is nothing to run.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import re

import jax
import numba
import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from llvmlite import ir

__all__ = ["call_frame", "null", "int32_scalar", "int32_1d", "int32_2d", "float32_1d", "float32_2d", "float32_3d",
           "float32_4d", "float32_5d", "prefetch", "register", "HANDLER_SIGNATURE"]

# Start numba's threading layer before any cached parallel function is loaded: a cached
# `parallel=True` function loaded first fails with "LLVM ERROR: Symbol not found: allocate_sched"
# (numba 0.68.1, measured); `get_num_threads` starts the layer.
numba.get_num_threads()

_EXTENSION_METADATA = 1
_STAGE_EXECUTE = 3

# A handler: `@cfunc(HANDLER_SIGNATURE)`, taking the XLA_FFI_CallFrame* and returning XLA_FFI_Error*.
HANDLER_SIGNATURE = types.voidptr(types.voidptr)


@functools.cache
def api_version() -> tuple[int, int]:
    """(major, minor) FFI API version of the jaxlib this process runs."""
    with open(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")) as f:
        header = f.read()
    major = re.search(r"#define XLA_FFI_API_MAJOR (\d+)", header)
    minor = re.search(r"#define XLA_FFI_API_MINOR (\d+)", header)
    if major is None or minor is None:
        raise RuntimeError("jaxlib's xla/ffi/api/c_api.h does not define XLA_FFI_API_MAJOR/MINOR; "
                           "cpu_kernels cannot register its FFI handlers with this jaxlib")
    return int(major.group(1)), int(minor.group(1))


# Frozen into the handlers when numba compiles them; `_drop_stale_cache` below keeps numba's
# on-disk cache from serving handlers built for another jaxlib's version.
_API_MAJOR, _API_MINOR = api_version()

# Beside numba's cache files: the FFI API version the cached handlers were compiled with.
VERSION_STAMP = "omni_jax_ffi_api_version"

# Beside them too: a digest of the helper modules that the kernels inline (`_loops`, `_tiles`, this
# one). numba checks only a cached function's own source file, so after an edit to a helper alone it
# would go on serving kernels compiled with the old helper (seen: crashes from a stale cache).
HELPERS_STAMP = "omni_jax_kernel_helpers"
_HELPER_SOURCES = ("_loops.py", "_tiles.py", "ffi.py")


def helpers_digest() -> str:
    """sha256 of the inlined helper modules' sources, as recorded in HELPERS_STAMP."""
    digest = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _HELPER_SOURCES:
        with open(os.path.join(here, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


def _drop_stale_cache() -> None:
    """Removes this package's cached handlers if they were compiled for another FFI API version, and
    all its cached kernels if they were compiled with other helper modules (HELPERS_STAMP).

    numba's on-disk cache is keyed on the source files and the numba and Python versions, not on
    jaxlib's, and each handler carries the version it answers XLA with as a constant: after
    switching to a jaxlib of another FFI version (or sharing one checkout between two), a cached
    handler would answer with the old one. A stamp in the cache directory records the version; when
    it differs, the handlers' cache files (`*._handler-*.nbi/.nbc`, small: the kernels they call are
    cached apart and stay) are removed, and numba compiles the handlers again on this import. A
    missing stamp is only written: a fresh cache holds nothing stale, and removing files another
    process may be loading is what the stamp avoids. The helpers' digest works the same way, for all
    the package's cache files (`*.nb[ic]`).
    """
    try:  # numba's own cache locator (an internal of the pinned numba), for the directory it uses
        from numba.core.caching import CompileResultCacheImpl  # noqa: PLC0415

        cache_dir = CompileResultCacheImpl(_drop_stale_cache)._locator.get_cache_path()
    except Exception:  # noqa: BLE001  (another numba layout: nothing to check against)
        return
    _check_stamp(cache_dir, VERSION_STAMP, f"{_API_MAJOR}.{_API_MINOR}", "*._handler-*.nb[ic]")
    _check_stamp(cache_dir, HELPERS_STAMP, helpers_digest(), "*.nb[ic]")


def _check_stamp(cache_dir: str, name: str, value: str, stale_files: str) -> None:
    """If the stamp `name` records another value, removes `stale_files`; then records `value`."""
    stamp = os.path.join(cache_dir, name)
    try:
        with open(stamp) as f:
            recorded = f.read().strip()
    except OSError:
        recorded = None
    if recorded == value:
        return
    if recorded is not None:
        for path in glob.glob(os.path.join(cache_dir, stale_files)):
            try:
                os.remove(path)
            except OSError:
                pass
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(value)
    except OSError:  # a read-only cache directory: numba will not cache there either
        pass


_drop_stale_cache()


@intrinsic
def pointer(typingctx, address):
    """An int64 address as a `voidptr` (for `numba.carray`)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.int64), codegen


@intrinsic
def prefetch(typingctx, address):
    """Software prefetch of the cache line at an int64 address into all cache levels (llvm.prefetch:
    read, locality 3). A hint: it never faults, whatever the address."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        byte_pointer = ir.IntType(8).as_pointer()
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(function, [builder.inttoptr(args[0], byte_pointer), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(types.int64), codegen


@intrinsic
def null(typingctx):
    """NULL `voidptr`: a handler's "no error" return value."""
    def codegen(context, builder, signature, args):
        return cgutils.voidptr_t(None)
    return types.voidptr(), codegen


@njit(inline="always")
def _words(address, count):
    return carray(pointer(address), (count,), dtype=np.int64)


@njit(inline="always")
def _answer_metadata(frame):
    """If XLA is asking for the handler's metadata, answers it and returns True."""
    if frame[1] == 0:
        return False
    extension = _words(frame[1], 3)  # struct_size, type (int32), next
    if (extension[1] & 0xFFFFFFFF) != _EXTENSION_METADATA:
        return False
    metadata = _words(frame[1], 4)[3]  # XLA_FFI_Metadata_Extension.metadata
    # XLA_FFI_Metadata: struct_size, api_version {struct_size, ext, major int32, minor int32}, traits uint32
    version = carray(pointer(metadata + 24), (2,), dtype=np.int32)
    version[0] = _API_MAJOR
    version[1] = _API_MINOR
    carray(pointer(metadata + 32), (1,), dtype=np.uint32)[0] = 0
    return True


@njit(inline="always")
def call_frame(address):
    """The call frame's words, or an empty array when this call is not one to execute (XLA's
    metadata query, answered here, or a stage before execution)."""
    frame = carray(address, (15,), dtype=np.int64)
    if _answer_metadata(frame) or (frame[4] & 0xFFFFFFFF) != _STAGE_EXECUTE:
        return frame[:0]
    return frame


@njit(inline="always")
def _buffer(frame, index, is_result):
    """Data address and dims (int64 array) of argument (or result) `index`."""
    table = _words(frame[14] if is_result else frame[9], index + 1)
    buffer = _words(table[index], 6)
    return pointer(buffer[3]), carray(pointer(buffer[5]), (buffer[4],), dtype=np.int64)


@njit(inline="always")
def int32_scalar(frame, index):
    address, _ = _buffer(frame, index, False)
    return carray(address, (1,), dtype=np.int32)[0]


@njit(inline="always")
def int32_1d(frame, index):
    address, dims = _buffer(frame, index, False)
    return carray(address, (dims[0],), dtype=np.int32)


@njit(inline="always")
def int32_2d(frame, index, is_result=False):
    address, dims = _buffer(frame, index, is_result)
    return carray(address, (dims[0], dims[1]), dtype=np.int32)


@njit(inline="always")
def float32_1d(frame, index, is_result=False):
    address, dims = _buffer(frame, index, is_result)
    return carray(address, (dims[0],), dtype=np.float32)


@njit(inline="always")
def float32_2d(frame, index, is_result=False):
    address, dims = _buffer(frame, index, is_result)
    return carray(address, (dims[0], dims[1]), dtype=np.float32)


@njit(inline="always")
def float32_3d(frame, index, is_result=False):
    address, dims = _buffer(frame, index, is_result)
    return carray(address, (dims[0], dims[1], dims[2]), dtype=np.float32)


@njit(inline="always")
def float32_4d(frame, index, is_result=False):
    address, dims = _buffer(frame, index, is_result)
    return carray(address, (dims[0], dims[1], dims[2], dims[3]), dtype=np.float32)


@njit(inline="always")
def float32_5d(frame, index, is_result=False):
    address, dims = _buffer(frame, index, is_result)
    return carray(address, (dims[0], dims[1], dims[2], dims[3], dims[4]), dtype=np.float32)


def register(name: str, handler_address: int) -> None:
    """Registers a handler (`cfunc.address`) as the CPU FFI target `name`."""
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    jax.ffi.register_ffi_target(name, new_capsule(handler_address, None, None), platform="cpu")
