"""The suite cannot pass with a skipped test (tests/no_skips.py): shown on a throwaway test file."""

from __future__ import annotations

import pytest


def test_a_run_with_a_skipped_test_fails(pytester: pytest.Pytester):
    pytester.makepyfile(test_skips="""
        import pytest

        def test_fine():
            assert True

        def test_missing_file():
            pytest.skip("some data file is absent")
    """)
    result = pytester.runpytest("-p", "no_skips")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*1 test(s) skipped*"])


def test_a_run_without_skips_passes(pytester: pytest.Pytester):
    pytester.makepyfile(test_fine="def test_fine():\n    assert True\n")
    result = pytester.runpytest("-p", "no_skips")
    assert result.ret == pytest.ExitCode.OK


def test_deselected_gpu_tests_are_not_skips(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    pytester.makepyfile(test_gpu="""
        import pytest

        @pytest.mark.gpu
        def test_on_cuda():
            raise AssertionError("runs only on a GPU machine")

        def test_fine():
            assert True
    """)
    result = pytester.runpytest("-p", "no_skips", "-m", "not gpu")
    result.assert_outcomes(passed=1, deselected=1)
    assert result.ret == pytest.ExitCode.OK
