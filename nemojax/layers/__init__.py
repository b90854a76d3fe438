"""Flax NNX layers of the Nemotron-H hybrid stack, one file per mixer."""
