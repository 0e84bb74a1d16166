"""Seeds for randomised tests: reproducible by default, replayable, fresh on request."""

import os
import random
import zlib


def seed_for(name):
    """$SEED to replay a failure (tests print their seed), else a seed fixed per test (CRC
    of its ``name``), so that a run is reproducible; RANDOM_SEEDS=1 draws fresh ones."""
    if os.environ.get("SEED"):
        return int(os.environ["SEED"])
    if os.environ.get("RANDOM_SEEDS") == "1":
        return random.randrange(1 << 32)
    return zlib.crc32(name.encode())


def new_seed():
    """The seed of the running pytest test (:func:`seed_for` its id)."""
    return seed_for(os.environ["PYTEST_CURRENT_TEST"].split(" ")[0])
