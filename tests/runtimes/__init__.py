"""Tests of slimserve.runtimes (a package so the tests can import shared helpers)."""
