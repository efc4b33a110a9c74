"""Reproduction of Ioffe & Szegedy (2015)'s experiments on top of the batchnorm library."""

__version__ = "0.1.0"
