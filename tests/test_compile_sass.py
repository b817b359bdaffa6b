"""bench.compile.sass: loops found in an nvdisasm listing and their instruction counts (a synthetic listing)."""

from __future__ import annotations

from bench.compile.sass import loops

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LOP3.LUT R2, R3, 0x80008000, RZ, 0xc0, !PT ;
        /*0020*/                   IMAD.SHL.U32 R4, R2, 0x2, RZ ;
        /*0030*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
        /*0050*/                   BRA `(.L_x_1) ;
.L_x_1:
        /*0060*/                   EXIT ;
"""


def test_a_backward_branch_is_a_loop_and_its_opcodes_are_counted() -> None:
    (lp,) = loops(LISTING)  # the forward branch to .L_x_1 is not a loop
    assert (lp.start, lp.end) == (1, 4)
    assert lp.size == 4 and lp.mma == 1
    assert lp.alu == 1  # LOP3 is on the INT32 ALU pipe; IMAD, HMMA and the predicated BRA are not
    assert lp.opcodes["BRA"] == 1
