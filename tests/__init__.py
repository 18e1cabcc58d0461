"""The test suite, as a package so that test modules import shared builders as `tests.support`."""
