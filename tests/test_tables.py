"""femurseg.core.tables: the CSV writer every command uses."""

from __future__ import annotations

import csv
import math

import numpy as np

from femurseg.core.tables import format_cell, write_csv


def test_cells_spell_out_nan_inf_and_round_to_6_digits():
    assert format_cell(math.nan) == "nan" and format_cell(np.float32("inf")) == "inf"
    assert format_cell(-math.inf) == "-inf" and format_cell(None) == ""
    assert format_cell(1 / 3) == "0.333333" and format_cell(np.float64(123456789.0)) == "1.23457e+08"
    assert format_cell(7) == "7" and format_cell("hip_0001") == "hip_0001"


def test_columns_are_the_union_in_first_seen_order_and_missing_cells_filled(tmp_path):
    rows = [{"case": "a", "dsc": 0.5}, {"case": "b", "asd_mm": math.nan}]
    p = write_csv(rows, tmp_path / "t.csv")
    back = list(csv.reader(open(p, newline="")))
    assert back == [["case", "dsc", "asd_mm"], ["a", "0.5", ""], ["b", "", "nan"]]
    write_csv(rows, tmp_path / "u.csv", columns=["dsc", "case"], missing=math.nan)
    assert list(csv.reader(open(tmp_path / "u.csv", newline=""))) == [["dsc", "case"], ["0.5", "a"], ["nan", "b"]]
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
