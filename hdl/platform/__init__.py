"""FPGA boards: Amaranth platforms, the hard IP settings and the Vivado build tree.

``make bitstream BOARD=<board>`` runs :mod:`.build`; the boards are in :data:`BOARDS`.
"""

from .alveo_u250 import AlveoU250Platform

#: ``BOARD=`` name -> platform class.
BOARDS = {"alveo_u250": AlveoU250Platform}
