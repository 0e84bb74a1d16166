"""The scenarios of ``tb/scenarios.py`` against the reference model (RefRig): every
scenario the cocotb tests run on the RTL runs here first, so a scenario that fails on the
RTL fails because of the RTL. Also the 16-bit index wrap in full, and the scoreboard of
``tb/scoreboard.py`` in lockstep over two models (one of them wrong on purpose)."""

import pytest

from memballoon import constants as c
from memballoon.params import DeviceParams
from memballoon.tb import scenarios
from memballoon.tb.scenarios import SCENARIOS, RefRig
from memballoon.tb.scoreboard import Lockstep, ScoreboardMismatch, random_stream
from model_util import asynctest


@pytest.mark.parametrize("name", list(SCENARIOS))
@asynctest
async def test_scenario(name):
    scenario, kwargs = SCENARIOS[name]
    rig = RefRig()
    await scenario(rig, **kwargs)
    assert rig.model.counters["MGMT_MSIX_FAILED"] == 0


@asynctest
async def test_story():
    """make sim's story on the model: the balloon ends 512 pages below zero."""
    rig = RefRig(DeviceParams())
    lines = await scenarios.story(rig)
    assert len(lines) == 2 + 11
    assert rig.model.balloon_pages == -512 and rig.model.counters["MGMT_GET_SHORT"] == 2


@asynctest
async def test_index_wrap():
    """virtio 1.2 2.7: past 65535 the avail and used indices wrap (the RTL runs a shorter
    stream; the wrap itself is cheap only here)."""
    rig = RefRig()
    await scenarios.index_wrap(rig, buffers=(1 << 16) + 40, queue_size=256)
    assert rig.model.queues[c.TODEVQ].last_avail == 42


@pytest.mark.parametrize("seed", range(4))
@asynctest
async def test_lockstep_of_two_models_agrees(seed):
    """The scoreboard over two reference models: the random stream of the RTL tests runs
    and every comparison holds."""
    lockstep = Lockstep(RefRig(), RefRig())
    steps = await random_stream(lockstep, seed, steps=40)
    assert steps == 40


@pytest.mark.parametrize("fault", ["bitmap", "counter", "grant", "min"])
@asynctest
async def test_lockstep_catches_a_wrong_device(fault):
    """The scoreboard fails, naming the seed, when the second device is wrong in one
    respect: a page it forgets, a counter it miscounts, a page it refuses to give back,
    a minimum it sends wrong."""
    wrong = RefRig()
    model = wrong.model
    if fault == "bitmap":
        enter = model._enter

        def forgetful(addr):
            enter(addr)
            if model.counters["MGMT_PAGES_ENTERED"] == 5:
                model.bitmap.discard(addr >> model.page_shift)
        model._enter = forgetful
    elif fault == "counter":
        count = model._count

        def miscount(name):
            count(name)
            if name == "MGMT_CMD_EXCHANGE":
                count(name)
        model._count = miscount
    elif fault == "grant":
        grantable = model._grantable

        def stingy(page):
            return grantable(page) and model.counters["MGMT_PAGES_LEFT"] != 3
        model._grantable = stingy
    else:
        send = model._send_min

        def wrong_min():
            if model.min_pending is not None:
                model.min_pending += 1
            send()
        model._send_min = wrong_min
    lockstep = Lockstep(RefRig(), wrong)
    with pytest.raises(ScoreboardMismatch, match="seed 3"):
        await random_stream(lockstep, 3, steps=60)
