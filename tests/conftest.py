"""Suite-wide settings: deterministic, offline, and sized for a 2-core CI machine.

pytest-xdist runs two workers; each keeps torch to one intra-op thread so the two do not fight
over the cores (and so CPU results do not depend on the thread count).
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
