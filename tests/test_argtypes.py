import argparse

import pytest

from wadi.argtypes import comma_list, positive_int, unit_interval


def test_comma_list_parses_each_item_and_skips_empty_ones():
    assert comma_list(int)("16, 32,") == [16, 32]
    assert comma_list(float)("") == []
    assert comma_list(unit_interval)("0.9,0.99") == [0.9, 0.99]


def test_comma_list_errors_are_argparse_usage_errors(capsys):
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--batches", type=comma_list(positive_int), default="16")
    assert parser.parse_args([]).batches == [16]  # a string default is parsed too
    for bad, message in (("16,0", "must be a positive integer, got 0"), ("1,x", "comma list")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--batches", bad])
        assert message in capsys.readouterr().err
