"""The sm_90 compile gate: every Triton kernel of fastes compiled for an H100 on a CPU machine.

``python -m bench.compile`` drives the real launchers (``cases.py``) on ``meta`` tensors through a
stand-in Triton driver (``driver.py``) that reports an sm_90 device, so each kernel goes through the
whole Triton pipeline to a cubin with Triton's bundled ptxas, at the constexprs, warps, stages and
grids the launchers choose. ``policy.py`` decides what fails the gate (docs/design.md, "Kernels and
their cost").
"""
