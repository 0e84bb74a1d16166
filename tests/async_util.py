"""Running coroutine tests of the driver model (sw/ against the reference model) under
plain pytest, without a pytest plugin."""

import asyncio
import functools


def asynctest(fn):
    """Make the coroutine function ``fn`` a plain test that runs it to completion."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper
