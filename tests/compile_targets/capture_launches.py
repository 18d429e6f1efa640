"""Record every Triton kernel launch the ``"triton"`` backend makes, with the signature of a CUDA launch.

Run **without** ``TRITON_INTERPRET`` (the interpreter replaces the ``@triton.jit`` kernels at import)::

    python tests/compile_targets/capture_launches.py --out specs.json [--n 16384] [--quick]

For each case of the matrix (dtype x option set x D x backward path) it runs the real launchers
(``triton_loss.triton_info_nce`` forward and backward) on CPU tensors of the real shapes, but
``JITFunction.run`` is replaced by a recorder: no kernel runs (their outputs stay uninitialised,
which the launchers never read back on the host). The launchers see no interpreter, so
``block_config`` returns the CUDA block sizes.

For each launch the recorder computes what ``JITFunction.run`` would hand to ``triton.compile``
on a CUDA device, with Triton's own code: the binder of ``create_function_from_signature`` (its
native ``specialize_impl``: pointer dtypes, ``i32``/``i64`` ints, ints equal to 1 turned into
constexprs, ``tt.divisibility=16`` for pointers whose address and ints whose value is a multiple
of 16) and ``JITFunction._pack_args`` (signature, constexprs, attrs, options), with the backend of
``GPUTarget("cuda", 90, 32)``. CPU tensors are 64-byte aligned (the CUDA caching allocator: 512),
and the launchers pass whole contiguous tensors, so the pointer attributes are those of a GPU run.

Output JSON: ``{"triton": version, "n": N, "launches": [spec, ...]}``, one spec per distinct
(kernel, signature, constexprs, attrs, num_warps, num_stages), each with the list of cases that
launch it. A spec: ``kernel`` ("module:qualname"), ``signature`` {arg: type}, ``constexprs``
{arg: value} (``{"tl_dtype": "fp32"}`` for ``tl`` dtypes), ``attrs`` {arg: [[name, value]]},
``options`` {num_warps, num_stages}, ``cases`` [str]. Prints a one-line summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("capture_launches.py must run without TRITON_INTERPRET=1 (the kernels would be interpreted)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime import jit as _jit  # noqa: E402

from simcse_kernels.ops import triton_loss  # noqa: E402
from simcse_kernels.options import InfoNCEOptions  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: option sets: name -> (K = N hard negatives?, InfoNCEOptions kwargs, learnable tau?)
OPTION_SETS = {
    "unsup": (False, {}, False),
    "sup_w": (True, dict(hard_negative_weight=0.2), False),
    "mixcse": (False, dict(mix_lambda=0.2), False),
    "symmetric": (False, dict(symmetric=True), False),
    "anchor_neg": (False, dict(anchor_negatives=True), False),
    "learnable_tau": (False, {}, True),
    "everything": (True, dict(hard_negative_weight=0.5, symmetric=True, anchor_negatives=True, mix_lambda=0.3),
                   True),
    # margins / dot similarity (issue 21): the MARGIN kernel variants
    "margin_everything": (True, dict(hard_negative_weight=0.5, symmetric=True, anchor_negatives=True,
                                     mix_lambda=0.3, margin=0.2, angular_margin=0.3), True),
    "dot_margin": (True, dict(hard_negative_weight=0.5, symmetric=True, anchor_negatives=True, similarity="dot",
                              margin=0.3), True),
}
DIMS = (384, 768, 1024)
PATHS = ("default", "atomic")
#: the reduced matrix of ``--quick`` (a smoke run of the recorder itself)
QUICK = dict(dtypes=("bf16",), option_sets=("unsup", "mixcse"), dims=(768,), paths=("default",))


def _json_value(value):
    """A JSON-able form of a constexpr value (``tl`` dtypes become ``{"tl_dtype": name}``)."""
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if isinstance(value, tl.constexpr):
        return _json_value(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot serialise constexpr value {value!r} ({type(value).__name__})")


class Recorder:
    """Stands in for ``JITFunction.run``: records the CUDA launch spec instead of launching."""

    def __init__(self, arch: int = 90):
        self.backend = make_backend(GPUTarget("cuda", arch, 32))
        self.binders: dict[int, object] = {}
        self.specs: dict[str, dict] = {}
        self.case = ""

    def run(self, fn, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
        binder = self.binders.get(id(fn))
        if binder is None:
            binder = self.binders[id(fn)] = _jit.create_function_from_signature(fn.signature, fn.params,
                                                                                self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args,
                                                              specialization, options)
        names = fn.arg_names
        spec = dict(
            kernel=f"{fn.module}:{fn.fn.__qualname__}",
            signature=dict(signature),
            constexprs={names[path[0]]: _json_value(v) for path, v in constexprs.items()},
            attrs={names[path[0]]: [list(a) for a in v] for path, v in attrs.items()},
            options=dict(num_warps=options.num_warps, num_stages=options.num_stages),
        )
        key = json.dumps(spec, sort_keys=True)
        entry = self.specs.setdefault(key, dict(spec, cases=[]))
        if self.case not in entry["cases"]:
            entry["cases"].append(self.case)
        return None


_GEMMS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
          torch.ops.aten.matmul, torch.ops.aten.addmm_, torch.ops.aten.baddbmm_, torch.ops.aten.addmv,
          torch.ops.aten.mv, torch.ops.aten.dot}


class SkipGemms(TorchDispatchMode):
    """Torch GEMMs and large dtype conversions return uninitialised outputs instead of computing.

    The default backward follows its ``∂L/∂s`` kernel with torch GEMMs (on CPU after upcasting
    16-bit chunks to fp32); at real N they would take minutes per case on a CPU, and they launch
    no Triton kernel, so the capture skips their arithmetic (shapes, strides and dtypes from the
    meta kernels; ``out=`` and in-place forms return their output tensor). The kernels never
    run either, so no value computed here is ever meaningful, and the launchers never read one
    back on the host.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        big_copy = (func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to)
                    and isinstance(args[0], torch.Tensor) and args[0].numel() >= 1 << 20)
        if func.namespace != "aten":  # the package's custom ops: run their CPU kernel under this mode
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        if func.overloadpacket not in _GEMMS and not big_copy:
            return func(*args, **kwargs)
        if "out" in kwargs:
            return kwargs["out"]
        if func.overloadpacket in (torch.ops.aten.addmm_, torch.ops.aten.baddbmm_):
            return args[0]
        meta = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        out = func(*meta[0], **meta[1])
        if big_copy and out.dtype == args[0].dtype:
            return func(*args, **kwargs)  # a no-op .to() (or a same-dtype copy): as is
        return torch.empty_strided(out.shape, out.stride(), dtype=out.dtype)


def run_case(n: int, d: int, dtype: torch.dtype, option_set: str) -> None:
    """Forward and backward of one case through ``triton_loss.triton_info_nce`` (launches recorded)."""
    has_neg, kwargs, learnable = OPTION_SETS[option_set]
    a, p = (torch.empty(n, d, dtype=dtype).requires_grad_(True) for _ in range(2))
    neg = torch.empty(n, d, dtype=dtype).requires_grad_(True) if has_neg else None
    tau = torch.tensor(0.05, requires_grad=True) if learnable else 0.05
    options = InfoNCEOptions(temperature=tau, **kwargs)
    with torch.no_grad():  # the kernels do not run: give the host-side code finite values
        for t in (a, p) + ((neg,) if has_neg else ()):
            t.normal_()
    with SkipGemms():
        loss = triton_loss.triton_info_nce(a, p, neg, torch.arange(n), options)
        loss.backward()


def capture(n: int, dtypes, option_sets, dims, paths) -> dict:
    """Run the matrix under the recorder; returns the JSON document (see the module docstring)."""
    recorder = Recorder()
    original_run = _jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return recorder.run(self, *args, grid=grid, warmup=warmup, **kwargs)

    saved_bwd = os.environ.get("SIMCSE_TRITON_BWD")
    _jit.JITFunction.run = run
    try:
        for dt, opt, d, path in itertools.product(dtypes, option_sets, dims, paths):
            os.environ["SIMCSE_TRITON_BWD"] = "atomic" if path == "atomic" else "two_kernel"
            if path == "default":
                os.environ.pop("SIMCSE_TRITON_BWD")
            recorder.case = f"{dt}/{opt}/D{d}/{path}"
            run_case(n, d, DTYPES[dt], opt)
    finally:
        _jit.JITFunction.run = original_run
        if saved_bwd is None:
            os.environ.pop("SIMCSE_TRITON_BWD", None)
        else:
            os.environ["SIMCSE_TRITON_BWD"] = saved_bwd
    return dict(triton=triton.__version__, n=n, launches=list(recorder.specs.values()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--n", type=int, default=16384, help="rows of anchors/positives/negatives")
    parser.add_argument("--quick", action="store_true", help="a reduced matrix (smoke run)")
    args = parser.parse_args(argv)
    matrix = QUICK if args.quick else dict(dtypes=tuple(DTYPES), option_sets=tuple(OPTION_SETS), dims=DIMS,
                                           paths=PATHS)
    torch.set_num_threads(1)
    start = time.perf_counter()
    doc = capture(args.n, **matrix)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    kernels = sorted({s["kernel"].split(":")[1] for s in doc["launches"]})
    print(f"captured {len(doc['launches'])} distinct launches of {len(kernels)} kernels "
          f"({', '.join(kernels)}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
