"""`make lint` stays clean: Verilator -Wall on the flattened top level (tb/lint.py)."""

import pytest

from memballoon.tb.lint import lint


@pytest.mark.parametrize("width", [512, 256])
def test_verilator_wall_is_clean(width, capsys):
    assert lint(width), capsys.readouterr().out
