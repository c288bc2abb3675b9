"""Helpers of the test suite: every module a test imports that is not itself a test.

Test modules and conftests import from here, never from each other (conftests keep only
fixtures); `tests/ops/test_test_layout.py` enforces it.
"""
