"""Suite-wide settings: DeepSpeed on the CPU when there is no GPU; quiet tokenizers."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
