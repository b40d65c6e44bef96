"""Pieces every model family uses: reading and writing weight files, stochastic depth, packed (varlen) attention."""
