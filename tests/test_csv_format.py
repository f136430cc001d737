"""The CSV tables (written through pandas) keep their exact format: what other tools and earlier runs read."""
from __future__ import annotations

import math

import numpy as np

from maml_runner.io import read_csv, write_csv


def test_cells_are_written_as_before_and_read_back_as_the_values_given(tmp_path):
    rows = [{"a": 1, "b": 0.1, "c": None, "d": math.nan, "e": True, "f": "x,y", "g": np.float64(1 / 3), "extra": 5},
            {"a": -2, "b": math.inf, "d": np.float32("nan"), "e": False, "f": 'say "hi"', "g": 2.5e20}]
    path = write_csv(tmp_path / "t.csv", rows, ["a", "b", "c", "d", "e", "f", "g"])
    assert path.read_text() == ('a,b,c,d,e,f,g\n'
                                '1,0.1,,nan,True,"x,y",0.3333333333333333\n'
                                '-2,inf,,nan,False,"say ""hi""",2.5e+20\n')
    back = read_csv(path, typed=True)
    assert back[0] == {"a": 1, "b": 0.1, "c": None, "d": back[0]["d"], "e": True, "f": "x,y", "g": 1 / 3}
    assert math.isnan(back[0]["d"]) and back[1]["b"] == math.inf and back[1]["c"] is None
    assert read_csv(path)[0]["c"] == ""  # untyped: strings as written


def test_header_only_and_empty_files(tmp_path):
    assert write_csv(tmp_path / "h.csv", [], ["x", "y"]).read_text() == "x,y\n"
    assert read_csv(tmp_path / "h.csv") == []
    (tmp_path / "empty.csv").write_text("")
    assert read_csv(tmp_path / "empty.csv") == []
