"""The cohort page: one HTML file listing every scan's findings and quality checks, with links to its files.

``<output_dir>/cohort.html`` opens in any browser without a server: one table, a row per scan of
``quality.tsv`` (controls and patients, labelled or not), with its role, SNR, the fraction of its brain
flagged and the volume and number of clusters at each level of the lesion masks, the
out-of-distribution verdict, and relative links to its findings figure (a thumbnail) and clusters
table. Styles are inline; nothing is fetched.
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from anomri import __version__
from anomri.errors import InputError
from anomri.evaluate.quality import quality_descriptions
from anomri.io.atomic import write_text
from anomri.io.derivatives import ScanDerivatives, level_label
from anomri.io.tables import read_table
from anomri.report.figures import FigurePaths

logger = logging.getLogger(__name__)

__all__ = ["CohortScan", "cohort_scans", "render_cohort_page", "write_cohort_page"]

#: Verdicts of the out-of-distribution check that make a scan's lesion masks unreliable.
OUT_OF_DISTRIBUTION = ("above", "below")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: right; vertical-align: middle; }
th { background: #f0f0f0; }
td.text { text-align: left; }
tr.ood td { background: #fde8e8; }
img { display: block; width: 180px; }
dt { font-weight: bold; margin-top: 0.4em; }
"""


@dataclass(frozen=True)
class CohortScan:
    """One row of the cohort page.

    Attributes
    ----------
    prefix : str
        The scan (``sub-<label>[_ses-<label>...]``).
    quality : dict
        Its row of ``quality.tsv`` (strings, ``n/a`` kept).
    clusters : dict
        Level -> (number of clusters, their volume in mm³), from its clusters table.
    peak : float or None
        The largest -log10 p of any of its clusters; None without one.
    table, figure : str or None
        Relative links from the page to its clusters table and findings figure (``figure`` None when missing).
    """

    prefix: str
    quality: dict[str, str]
    clusters: dict[float, tuple[int, float]]
    peak: float | None
    table: str
    figure: str | None


def _prefix(row: dict[str, str]) -> str:
    session = row.get("session", "n/a")
    return row["participant_id"] + ("" if session in ("", "n/a") else f"_{session}")


def _link(target: Path, page: Path) -> str:
    """``target`` relative to the page's folder, as a URL path."""
    return quote(Path(os.path.relpath(target, page.parent)).as_posix())


def _check_levels(table: Path, levels: Sequence[float]) -> None:
    """Refuse a clusters table whose sidecar lists other levels: its clusters would silently count as none."""
    sidecar = table.with_suffix(".json")
    try:
        written = json.loads(sidecar.read_text()).get("FalsePositiveLevels") if sidecar.is_file() else None
    except (OSError, ValueError) as exc:
        raise InputError(sidecar, f"unreadable JSON ({exc})") from exc
    missing = [a for a in levels if written is not None and not any(abs(a - w) < 1e-12 for w in written)]
    if missing:
        raise InputError(table, f"has no clusters of level {', '.join(f'{a:g}' for a in missing)} (its levels: "
                                f"{', '.join(f'{w:g}' for w in written)}); pass the levels of the run")


def cohort_scans(derivatives_dir: str | Path, quality_path: str | Path, levels: Sequence[float],
                 out: str | Path) -> list[CohortScan]:
    """Every scan of ``quality.tsv`` with its clusters and the links of a page written to ``out``.

    Parameters
    ----------
    derivatives_dir : str or Path
        The derivatives root: each scan's clusters table, and ``figures/``.
    quality_path : str or Path
        ``quality.tsv`` (``anomri quality``).
    levels : sequence of float
        The levels of the lesion masks.
    out : str or Path
        Where the page goes: links are relative to its folder.

    Returns
    -------
    list of CohortScan
        One per row of ``quality.tsv``, in its order.

    Raises
    ------
    InputError
        A missing or malformed ``quality.tsv`` or clusters table, or a table of other levels.
    """
    derivatives_dir, out = Path(derivatives_dir), Path(out)
    quality_path = Path(quality_path)
    if not quality_path.is_file():
        raise InputError(quality_path, "file not found (anomri quality writes it)")
    rows = read_table(quality_path)
    figures = FigurePaths(derivatives_dir / "figures")
    scans = []
    for row in rows:
        if "participant_id" not in row:
            raise InputError(quality_path, "no participant_id column")
        prefix = _prefix(row)
        table = ScanDerivatives(derivatives_dir, prefix).clusters_table
        if not table.is_file():
            raise InputError(table, "file not found (anomri clusters writes it)")
        clusters = read_table(table)
        _check_levels(table, levels)
        try:
            by_level = {a: [c for c in clusters if float(c["level"]) == float(a)] for a in levels}
            summary = {a: (len(found), sum(float(c["volume_mm3"]) for c in found)) for a, found in by_level.items()}
            peak = max((float(c["neglog10p_peak"]) for c in clusters), default=None)
        except (KeyError, ValueError) as exc:
            raise InputError(table, f"not a clusters table of anomri ({exc})") from exc
        figure = figures.findings(prefix)
        if not figure.is_file():
            logger.warning("%s: no findings figure (%s)", prefix, figure)
        scans.append(CohortScan(prefix, row, summary, peak, _link(table, out),
                                _link(figure, out) if figure.is_file() else None))
    return scans


def _number(value: str | float | None, digits: int = 3) -> str:
    if value is None or value in ("", "n/a"):
        return "n/a"
    return f"{float(value):.{digits}g}"


def _percent(value: str | None) -> str:
    return "n/a" if value in (None, "", "n/a") else f"{100 * float(value):.3g} %"


def render_cohort_page(scans: Sequence[CohortScan], levels: Sequence[float], quality_link: str = "quality.tsv",
                       title: str = "anomri findings") -> str:
    """The HTML of the cohort page.

    Parameters
    ----------
    scans : sequence of CohortScan
        The rows, in their order (:func:`cohort_scans`).
    levels : sequence of float
        The levels of the lesion masks: a column group each, the loosest first.
    quality_link : str
        The relative link to ``quality.tsv``.
    title : str
        The page's title.

    Returns
    -------
    str
        The page: one file, styles inline, links relative.
    """
    esc = html.escape
    described = quality_descriptions(levels)
    ordered = sorted(levels, reverse=True)
    head = [("scan", "The scan: participant, then the session and the entities that tell its scans apart"),
            ("role", described["role"]["Description"]), ("SNR", described["snr"]["Description"])]
    for a in ordered:
        head.append((f"brain flagged, p ≤ {a:g}", described[f"flagged_{level_label(a)}"]["Description"]))
    for a in ordered:
        head.append((f"clusters, p ≤ {a:g}", f"Connected components of the lesion mask at level {a:g}"))
        head.append((f"volume, p ≤ {a:g} (mm³)", f"Volume of the lesion mask's clusters at level {a:g}"))
    head += [("peak −log10 p", "Largest -log10 p of any cluster (2 is p = 0.01)"),
             ("verdict", described["verdict"]["Description"]),
             ("figure", "-log10 p over the mean b0 through the largest clusters (click to enlarge)"),
             ("clusters table", "Every cluster: size, volume, probability, -log10 p, centroid")]
    lines = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{esc(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>", f"<h1>{esc(title)}</h1>"]
    unreliable = [s.prefix for s in scans if s.quality.get("verdict") in OUT_OF_DISTRIBUTION]
    controls = sum(s.quality.get("role") == "control" for s in scans)
    lines.append(f"<p>{len(scans)} scan{'' if len(scans) == 1 else 's'} ({controls} "
                 f"control{'' if controls == 1 else 's'}). "
                 "Flagged: voxels whose calibrated healthy tail probability p is at most the level, so a healthy "
                 "brain has about that fraction flagged. "
                 + (f"<strong>Out of distribution (lesion masks not reliable): {esc(', '.join(unreliable))}.</strong>"
                    if unreliable else "No scan is out of distribution.")
                 + "</p>")
    lines.append("<table>")
    lines.append("<tr>" + "".join(f'<th title="{esc(tip)}">{esc(name)}</th>' for name, tip in head) + "</tr>")
    for scan in scans:
        q = scan.quality
        verdict = q.get("verdict", "n/a")
        shift = (f"shift {_number(q.get('shift'))}, controls {_number(q.get('control_shift_low'))} to "
                 f"{_number(q.get('control_shift_high'))}")
        cells = [f'<td class="text">{esc(scan.prefix)}</td>', f'<td class="text">{esc(q.get("role", "n/a"))}</td>',
                 f"<td>{_number(q.get('snr'))}</td>"]
        cells += [f"<td>{_percent(q.get(f'flagged_{level_label(a)}'))}</td>" for a in ordered]
        for a in ordered:
            count, volume = scan.clusters[a]
            cells += [f"<td>{count}</td>", f"<td>{volume:.0f}</td>"]
        cells.append(f"<td>{_number(scan.peak)}</td>")
        cells.append(f'<td class="text" title="{esc(shift)}">{esc(verdict)}</td>')
        if scan.figure:
            link = esc(scan.figure)
            cells.append(f'<td><a href="{link}"><img src="{link}" alt="{esc(scan.prefix)} findings" '
                         'loading="lazy"></a></td>')
        else:
            cells.append('<td class="text">not written</td>')
        cells.append(f'<td class="text"><a href="{esc(scan.table)}">TSV</a></td>')
        row_class = ' class="ood"' if verdict in OUT_OF_DISTRIBUTION else ""
        lines.append(f"<tr{row_class}>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    lines.append("<h2>Columns</h2>")
    lines.append("<dl>" + "".join(f"<dt>{esc(name)}</dt><dd>{esc(tip)}</dd>" for name, tip in head) + "</dl>")
    lines.append(f"<p>Written by anomri {esc(__version__)}. Each scan's clusters table has a JSON sidecar "
                 f'describing its columns; <a href="{esc(quality_link)}">quality.tsv</a> (and its sidecar) holds '
                 "the quality checks.</p>")
    lines += ["</body>", "</html>"]
    return "\n".join(lines) + "\n"


def write_cohort_page(derivatives_dir: str | Path, quality_path: str | Path, levels: Sequence[float],
                      out: str | Path) -> list[CohortScan]:
    """Write the cohort page ``out`` (``<output_dir>/cohort.html``): every scan of ``quality.tsv``.

    Parameters
    ----------
    derivatives_dir : str or Path
        The derivatives root.
    quality_path : str or Path
        ``quality.tsv``.
    levels : sequence of float
        The levels of the lesion masks (``probability.levels``).
    out : str or Path
        The page.

    Returns
    -------
    list of CohortScan
        The scans listed (:func:`cohort_scans`).
    """
    if not levels:
        raise InputError("--levels", "at least one lesion-mask level is needed")
    scans = cohort_scans(derivatives_dir, quality_path, levels, out)
    write_text(out, render_cohort_page(scans, levels, _link(Path(quality_path), Path(out))))
    logger.info("cohort page of %d scans written to %s", len(scans), out)
    return scans
