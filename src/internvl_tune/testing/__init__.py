"""Test and demo fixtures: tiny random checkpoints with the exact on-disk layouts of the releases.

Never imported by the library or the trainer; used by ``internvl-tune tiny-model``, ``internvl-tune demo``, the
benchmarks and the tests.
"""
