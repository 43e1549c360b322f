import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# One thread per process: on the shared 2-core machines two threads ran small models up to 10x
# slower. Hypothesis: no deadline (the machine is noisy), a modest number of examples.
torch.set_num_threads(1)
settings.register_profile("pgpo", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("pgpo")
