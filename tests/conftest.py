import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# One thread per process: on the shared 2-core machines two threads ran small models up to 10x
# slower. Hypothesis: no deadline (the machine is noisy), a modest number of examples.
torch.set_num_threads(1)
settings.register_profile("pgpo", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("pgpo")


def save_sharp_qwen3(folder, hidden: int, layers: int, head_dim: int, scale: float):
    """A small Qwen3 (real vocabulary, 2 heads, tied) with every weight but the norms scaled by
    ``scale``, saved to ``folder``: peaked, context-dependent distributions."""
    from pgpo.train.models.model import small_qwen3

    model = small_qwen3(151_936, hidden, layers, 2, 1, head_dim, True, (151643, 151645, 151643),
                        4096, seed=0)  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(scale)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sharp_model(tmp_path_factory):
    """A folder with a small Qwen3 (real vocabulary, head_dim 64)
    whose weights are scaled 8x: peaked, context-dependent distributions, so that the teacher
    differs clearly from the student (I_k of a few 1e-3 nats, far above float32 noise) and a
    training step moves log-probs by far more than kernel differences."""
    return save_sharp_qwen3(tmp_path_factory.mktemp("sharp-qwen3"), 64, 2, 64, 8.0)
