"""The command words a virtqueue engine owes the function for a command's readable bytes
(``hdl/virtqueue/interface.py``, ``CommandWords``; C5), for testbenches to compare with."""

from ..hdl.virtqueue.interface import COMMAND_LANES


def command_beats(readable):
    """``[(words, last)]``: the le64 words of ``readable`` (the last one zero-padded) in
    beats, the first word alone, then ``COMMAND_LANES`` a beat but the last; no beat for
    no bytes."""
    words = [int.from_bytes(readable[offset:offset + 8], "little")
             for offset in range(0, len(readable), 8)]
    groups = [words[:1]] + [words[index:index + COMMAND_LANES]
                            for index in range(1, len(words), COMMAND_LANES)]
    groups = [group for group in groups if group]
    return [(group, index == len(groups) - 1) for index, group in enumerate(groups)]
