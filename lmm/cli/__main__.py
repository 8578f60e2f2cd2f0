"""`python -m lmm.cli ...` (and `torchrun --nproc_per_node N -m lmm.cli data label ...`): the `lmm` command."""

from lmm.cli import main

if __name__ == "__main__":
    main()
