"""Seeds for randomised unit tests: reproducible by default, replayable, fresh on request."""

import os
import random
import zlib


def new_seed():
    """$SEED to replay a failure (tests print their seed), else a seed fixed per test (CRC
    of the pytest id), so that a run is reproducible; RANDOM_SEEDS=1 draws fresh ones."""
    if os.environ.get("SEED"):
        return int(os.environ["SEED"])
    if os.environ.get("RANDOM_SEEDS") == "1":
        return random.randrange(1 << 32)
    return zlib.crc32(os.environ["PYTEST_CURRENT_TEST"].split(" ")[0].encode())
