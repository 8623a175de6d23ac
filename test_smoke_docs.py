"""Tests for smoke_docs.py: the docs' smoke table is made from make smoke's results, and matches
them."""

import os

import pytest

import smoke_docs
from conftest import HERE

HAND_MADE = """table,row,teacher,student,mean,std,n,paper_mean,paper_std,notes
last,Teacher,resnet20,resnet8,100.0,,1,,,
best,Teacher,resnet20,resnet8,100.0,,1,,,
last,Student,resnet20,resnet8,70.3125,4.4194,2,,,
last,KD,resnet20,resnet8,76.1719,2.7621,2,,,
best,KD,resnet20,resnet8,99.0,0.0,2,,,
last,PEFD,resnet20,resnet8,83.2031,4.9718,2,,,
"""


def test_the_table_is_the_last_epochs_rows_in_order_and_missing_ones_say_so():
    assert smoke_docs.smoke_table(HAND_MADE).splitlines() == [
        "| resnet20 → resnet8, test top-1 (%) after the last epoch | mean | ± std | seeds |",
        "|---|---|---|---|",
        "| Teacher | 100.00 |  | 1 |",
        "| Student | 70.31 | 4.42 | 2 |",
        "| KD | 76.17 | 2.76 | 2 |",  # the last epoch's, not the best's
        "| SP | missing | | |",
        "| CRD-lite | missing | | |",
        "| PEFD | 83.20 | 4.97 | 2 |",
    ]


def test_the_table_goes_between_its_markers_and_check_finds_a_stale_doc(tmp_path):
    results = tmp_path / "results"
    (results / "figures").mkdir(parents=True)
    (results / "synthetic.csv").write_text(HAND_MADE)
    (results / "figures" / smoke_docs.FIGURE).write_bytes(b"new figure")
    doc, figure = tmp_path / "doc.md", tmp_path / "curves.png"
    doc.write_text(f"before\n{smoke_docs.BEGIN}\n| old | 1.00 |\n{smoke_docs.END}\nafter\n")
    figure.write_bytes(b"old figure")
    args = ["--results", str(results), "--doc", str(doc), "--figure", str(figure)]
    assert smoke_docs.main(args + ["--check"]) == 1
    assert smoke_docs.main(args) == 0
    assert doc.read_text() == (
        f"before\n{smoke_docs.BEGIN}\n{smoke_docs.smoke_table(HAND_MADE)}\n"
        f"{smoke_docs.END}\nafter\n"
    )
    assert figure.read_bytes() == b"new figure"
    assert smoke_docs.main(args + ["--check"]) == 0


def test_the_docs_show_what_make_smoke_produced_here():
    results = os.path.join(HERE, "results", "synthetic-e2")
    if not os.path.isfile(os.path.join(results, "synthetic.csv")):
        pytest.skip("no make smoke results in this checkout (make smoke, then make docs)")
    assert (
        smoke_docs.main(
            [
                "--results",
                results,
                "--doc",
                os.path.join(HERE, "docs", "pipeline.md"),
                "--figure",
                os.path.join(HERE, "docs", "smoke-curves.png"),
                "--check",
            ]
        )
        == 0
    )


def test_the_docs_hold_a_generated_smoke_table():
    doc = open(os.path.join(HERE, "docs", "pipeline.md")).read()
    table = doc.split(smoke_docs.BEGIN)[1].split(smoke_docs.END)[0]
    assert [line.split(" |")[0] for line in table.strip().splitlines()[2:]] == [
        f"| {r}" for r in smoke_docs.ROWS
    ]
