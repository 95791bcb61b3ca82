"""Drivers run by hand or by make, beside ``bench/``: ``soak`` (a million tasks through the
stack, ``make soak``) and ``fuzz_decoder`` (the collector's decoder under atheris). Not part of
the installed package; they use ``tests.support`` for real servers."""
