"""The docs' numbers and picture from `make smoke`'s own output, so that they cannot go stale:
`make docs` runs make smoke, then this, which writes docs/pipeline.md's smoke table (between its two
marker lines) from the smoke pipeline's results/synthetic-e2/synthetic.csv, and copies its curves
figure to docs/smoke-curves.png.

    python smoke_docs.py --results results/synthetic-e2 --doc docs/pipeline.md \
        --figure docs/smoke-curves.png
    python smoke_docs.py ... --check   # exit 1 if the docs differ from those results
"""

import argparse
import csv
import io
import os
import shutil
import sys

BEGIN = ("<!-- smoke table: written by `make docs` from make smoke's synthetic.csv; "
         "do not edit by hand -->")
END = "<!-- end of the smoke table -->"
ROWS = (
    "Teacher",
    "Student",
    "KD",
    "SP",
    "CRD-lite",
    "PEFD",
)  # tables.py's row names, in the table's order
FIGURE = "resnet20-resnet8-curves.png"


def smoke_table(csv_text):
    """Markdown: each row of the smoke pipeline's last-epoch table, top-1 (%) mean ± std (n
    seeds)."""
    rows = [r for r in csv.DictReader(io.StringIO(csv_text)) if r["table"] == "last"]
    by_name = {r["row"]: r for r in rows}
    pair = f"{rows[0]['teacher']} → {rows[0]['student']}" if rows else "?"
    lines = [
        f"| {pair}, test top-1 (%) after the last epoch | mean | ± std | seeds |",
        "|---|---|---|---|",
    ]
    for name in ROWS:
        r = by_name.get(name)
        if r is None or r["mean"] == "":
            lines.append(f"| {name} | missing | | |")
            continue
        std = f"{float(r['std']):.2f}" if r["std"] else ""
        lines.append(f"| {name} | {float(r['mean']):.2f} | {std} | {r['n']} |")
    return "\n".join(lines)


def with_table(doc, table):
    """`doc` with the text between its BEGIN and END lines replaced by `table`."""
    if BEGIN not in doc or END not in doc:
        raise SystemExit(
            f"smoke_docs: error: the doc has no smoke table markers ({BEGIN!r} ... {END!r})"
        )
    head, rest = doc.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results", default="results/synthetic-e2", help="make smoke's results folder"
    )
    parser.add_argument(
        "--doc", default="docs/pipeline.md", help="the doc whose smoke table is written"
    )
    parser.add_argument(
        "--figure", default="docs/smoke-curves.png", help="where the smoke curves figure is copied"
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the docs differ"
    )
    args = parser.parse_args(argv)
    results_csv = os.path.join(args.results, "synthetic.csv")
    if not os.path.isfile(results_csv):
        raise SystemExit(f"smoke_docs: error: no {results_csv}: run make smoke first")
    with open(results_csv) as f:
        table = smoke_table(f.read())
    with open(args.doc) as f:
        doc = f.read()
    new_doc = with_table(doc, table)
    figure = os.path.join(args.results, "figures", FIGURE)
    if args.check:
        with open(figure, "rb") as made, open(args.figure, "rb") as shown:
            same_figure = made.read() == shown.read()
        stale = [
            name
            for name, same in ((args.doc, new_doc == doc), (args.figure, same_figure))
            if not same
        ]
        if stale:
            print(
                f"smoke_docs: {' and '.join(stale)} differ from {args.results}: run make docs",
                file=sys.stderr,
            )
            return 1
        return 0
    with open(args.doc, "w") as f:
        f.write(new_doc)
    shutil.copyfile(figure, args.figure)
    print(f"smoke_docs: {args.doc}'s smoke table and {args.figure} from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
