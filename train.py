#!/usr/bin/env python
"""Train an lmm model: `python train.py --config CONFIG.yaml [dotted.key=value ...]`.

The same as `lmm train`; under `torchrun --nproc_per_node N train.py ...` set distributed=ddp or fsdp2.
"""

from lmm.runtime import enable_tf32, offline

if __name__ == "__main__":
    offline()  # local files only, set before transformers loads (it would retry the hub for every missing file)
    enable_tf32()
    from lmm.cli.train import main

    main()
