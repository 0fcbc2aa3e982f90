"""Random processes that render Phase I images (no real data, no privacy cost).

``list_processes()``, ``describe_process(name)``, ``get_process(name)``; a process renders
``render(indices, seed=, size=)`` -> uint8 (n, size, size, 3), each image a pure function of
(seed, index, size). ``stylegan-oriented`` is the default and the one DP-RandP uses.
"""

from dprandp.processes import dead_leaves, spectrum, stylegan
from dprandp.processes.registry import (
    RandomProcess,
    describe_process,
    get_process,
    list_processes,
    register_process,
)

DEFAULT_PROCESS = "stylegan-oriented"

register_process("stylegan-oriented", stylegan.oriented)
register_process("stylegan-oriented-n512", stylegan.oriented_n512)
register_process("stylegan-highfreq", stylegan.highfreq)
register_process("stylegan-random", stylegan.random)
register_process("dead-leaves-squares", dead_leaves.squares)
register_process("dead-leaves-oriented", dead_leaves.oriented)
register_process("dead-leaves-shapes", dead_leaves.shapes)
register_process("spectrum", spectrum.SpectrumColour)

__all__ = [
    "DEFAULT_PROCESS",
    "RandomProcess",
    "describe_process",
    "get_process",
    "list_processes",
    "register_process",
]
