#!/usr/bin/env python
"""Train an lmm model: `python train.py --config CONFIG.yaml [dotted.key=value ...]`.

The same as `lmm train`; under `torchrun --nproc_per_node N train.py ...` set distributed=ddp or fsdp2.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lmm.cli.train import main  # noqa: E402

if __name__ == "__main__":
    from lmm.runtime import enable_tf32

    enable_tf32()
    main()
