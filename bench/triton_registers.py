"""Registers and occupancy of the Triton loss kernel, compiled for Hopper (sm_90a) on any machine:
no GPU needed, only Triton (its bundled ptxas). What decides the kernel's speed at d8 is how many
rows an SM holds at once (bench/NOTES.md round 5); this answers that before a GPU is lent.

    PYTHONPATH=. python bench/triton_registers.py [--vocab 8192] [--warps 8 16 32] [--dtype bf16]
"""
import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit("bench/triton_registers.py needs Triton: pip install triton (CUDA builds of torch ship it)")

from llmlabs.kernels import triton_loss

REGISTERS_PER_SM, WARPS_PER_SM = 65536, 64  # Hopper


def signature(dtype):
    return {"z_ptr": f"*{dtype}", "z_stride": "i64", "dz_ptr": f"*{dtype}", "dz_stride": "i64", "t_ptr": "*i64",
            "loss_ptr": "*fp32", "V": "i32", "cap": "fp32", "BLOCK": "constexpr", "SINGLE": "constexpr",
            "APPROX": "constexpr"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--warps", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="the logits' dtype: bf16 takes the approximate tanh, fp32 the exact form")
    args = p.parse_args()
    single = args.vocab <= triton_loss.SINGLE_MAX
    block = triton.next_power_of_2(args.vocab) if single else triton_loss.BLOCK
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    approx = args.dtype == "bf16"
    print(f"vocab {args.vocab}, {args.dtype} logits: {'one block in registers' if single else 'two-pass loop'}, "
          f"BLOCK {block}, {'approximate' if approx else 'exact'} tanh")
    for warps in args.warps:
        src = ASTSource(triton_loss._softcap_ce_kernel, signature(args.dtype),
                        constexprs={"BLOCK": block, "SINGLE": single, "APPROX": approx})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "k.ptx").write_text(ptx)
            info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                                  capture_output=True, text=True, check=True).stderr
        regs = int(re.search(r"Used (\d+) registers", info).group(1))
        spills = int(re.search(r"(\d+) bytes spill stores", info).group(1))
        rows = min(REGISTERS_PER_SM // (regs * 32 * warps), WARPS_PER_SM // warps)
        ops = {op: ptx.count(op) for op in ("tanh.approx", "ex2.approx", "div.full", "lg2.approx")}
        print(f"  {warps:2d} warps: {regs:3d} registers/thread, {rows} row(s) per SM, {spills} B spilled; "
              f"special-function ops in the PTX: {ops}")


if __name__ == "__main__":
    main()
