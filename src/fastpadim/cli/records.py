"""``fastpadim records``: what the inspection records hold: counts per period, model and version, the latest
verdicts, and an export for a spreadsheet or a notebook."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FastpadimError
from .console import out, say, user_errors

PERIOD_FORMATS = {"hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d"}


def records(
    database: Annotated[str, typer.Argument(metavar="DB", help="The records: a SQLite file, or a URL sqlite:///FILE or postgresql://USER:PASSWORD@HOST/DATABASE.")],
    per: Annotated[str, typer.Option("--per", help="Count per UTC day or hour.")] = "day",
    model: Annotated[Optional[str], typer.Option("--model", help="Only this model (its name, e.g. bottle for bottle.v2.padim).")] = None,
    last: Annotated[int, typer.Option("--last", help="Show the latest N inspections (0: none).")] = 10,
    export: Annotated[Optional[Path], typer.Option("--export", metavar="FILE", help="Also write every record to FILE (.csv or .parquet).")] = None,
) -> None:
    """Show the inspection records that predict, serve and watch wrote (--record DB): the number of inspections,
    per period, model and version the anomaly rate and the operators' labels, and the latest verdicts."""
    with user_errors():
        if per not in PERIOD_FORMATS:
            raise FastpadimError(f"--per is day or hour, got {per!r}")
        if last < 0:
            raise FastpadimError(f"--last must be 0 or more, got {last}")
        from ..records import Records

        with Records(database, create=False) as store:  # reading never creates an empty database
            summary = store.summary(per, model=model)
            latest = store.recent(limit=last, model=model) if last else []
            total = sum(row["inspections"] for row in summary)
            exported = store.export(export) if export is not None else None
            where = store.url
        about = f" of model {model}" if model else ""
        show(f"{where}: {total} inspections{about}")
        if summary:
            show(f"\nper {per} (UTC)\n" + summary_table(summary, per))
        if latest:
            show(f"\nlatest {len(latest)}\n" + latest_table(latest))
        if exported is not None:
            say(f"exported {exported} inspections to {export}")


def show(text: str) -> None:
    out.print(text, highlight=False, markup=False, soft_wrap=True)  # paths may hold [brackets]


def summary_table(rows: list[dict], per: str) -> str:
    headers = [per, "model", "version", "inspections", "anomalous", "anomaly rate", "false alarms", "confirmed defects"]
    cells = []
    for row in rows:
        start = datetime.datetime.fromisoformat(row["period"]).strftime(PERIOD_FORMATS[per])
        rate = "–" if row["anomaly_rate"] is None else f"{row['anomaly_rate']:.1%}"
        cells.append([start, row["model"], f"v{row['model_version']}", str(row["inspections"]), str(row["anomalous"]),
                      rate, str(row["false_alarms"]), str(row["confirmed_defects"])])
    return text_table(headers, cells, left=2)


def latest_table(inspections: list) -> str:
    headers = ["id", "time (UTC)", "source", "model", "score", "normalized", "verdict", "label", "path"]
    cells = [[str(i.id), i.time.strftime("%Y-%m-%d %H:%M:%S"), i.source, f"{i.model} v{i.model_version}",
              number(i.score, ".4g"), number(i.normalized, ".3f"), i.verdict, i.label or "", i.path]
             for i in inspections]
    return text_table(headers, cells, left=4, right=(0, 4, 5))


def text_table(headers: list[str], rows: list[list[str]], left: int, right: tuple[int, ...] | None = None) -> str:
    """Columns two spaces apart, one line per row whatever the width (for grep and logs); numbers to the right:
    the columns from ``left`` on, or those in ``right``."""
    right = tuple(range(left, len(headers))) if right is None else right
    widths = [max(len(line[i]) for line in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for line in [headers, *rows]:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)
