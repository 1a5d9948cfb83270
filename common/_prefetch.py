"""A software prefetch for numba kernels: `prefetch(array, index)` asks the CPU to bring
array[index] (a 1-D array) into its caches, without waiting for it.

Why: the server's incremental passes read columns scattered over its (n, d) states — cm's band
on the union U of a round's touched columns, the rewrite of ĝ at those columns. Each row is then
read at ascending but irregular offsets, too far apart for the hardware's stream prefetchers and
too close for them to give up, and the loops waited on one cache miss after another: at
d = 10⁷ with |U| = 16.5 % the band took 55–65 ms, and asking 128 columns ahead takes it to
27–34 ms (`benchmarks/bench_state_layout.py`). The loops read the same values in the same
order, so results are bitwise unchanged.

numba exposes no prefetch, so this lowers to LLVM's `llvm.prefetch` (read, high locality,
data cache) through `numba.extending.intrinsic`. A prefetch is a hint: it never faults and never
changes a value, so an index past the end would cost nothing but a wasted load. The callers
still pass only indices they are about to read.

numba's on-disk cache of a kernel is keyed on its own module's source file, not on this one's:
after changing `AHEAD` or the intrinsic, clear the callers' `__pycache__` (or touch their
files), or their cached machine code keeps the old ones. A fresh install compiles afresh.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

#: How far ahead, in a kernel's own list of columns, it asks for the next reads: far enough to
#: cover a miss to memory at the rate the band reads columns (measured at 16, 32, 64, 128, 256
#: and 512 at d = 10⁶ and 10⁷, |U| = 2 % and 16.5 %: 128–256 were the fastest everywhere).
AHEAD = 128


@intrinsic
def prefetch(typingctx, array, index):  # type: ignore[no-untyped-def]  # pragma: no cover
    """Hint that array[index] (1-D, any dtype) will be read soon."""
    signature = types.void(array, index)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        array_type = sig.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(
            context, builder, array_type, view, [args[1]], wraparound=False
        )
        byte = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        hint = ir.FunctionType(ir.VoidType(), [byte, i32, i32, i32])
        function = cgutils.get_or_insert_function(builder.module, hint, "llvm.prefetch.p0i8")
        # rw = 0 (read), locality = 3 (keep in all levels), cache type = 1 (data)
        builder.call(function, [builder.bitcast(pointer, byte), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return signature, codegen


@njit(cache=True, inline="always")
def prefetch_ahead(array, indices, i):  # pragma: no cover - compiled
    """Hint that array[indices[i + AHEAD]] will be read soon: the read `AHEAD` places on in a
    loop over `indices` (1-D), or, for the last `AHEAD` places, the last one again (a repeated
    hint costs nothing), so the loop needs no second copy of its body for the end."""
    prefetch(array, indices[min(i + AHEAD, indices.shape[0] - 1)])
