"""Builders that several test modules share: plain functions and constants, never collected as tests.

Resources built once per session (the packed demo, the tiny BERT on disk) are fixtures in
`tests/conftest.py`; what lives here is what a test calls with its own arguments. No test
module imports another test module.
"""
