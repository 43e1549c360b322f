"""``python -m pgpo.train`` (what ``torchrun`` launches): the same as ``pgpo train``.

torchrun --nproc-per-node 4 -m pgpo.train --config qwen3-8b-pgpo [key=value ...]
"""

import sys

from pgpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
