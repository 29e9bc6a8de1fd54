r"""The audit report: every node's fate and *all* problems, each with code, why and hint.

:class:`Report` holds one :class:`NodeReport` per graph node (status ``"converted"``,
``"passthrough"`` — inputs, weights, metadata reads, the output — or ``"rejected"``) and a
summary: convertible or not, exact or bound likelihood, latent size, and the number of
parameters the densities add. The titles, explanations and hints come from the diagnostic
catalogue :data:`flowconvert.errors.DIAGNOSTICS`.

>>> problem = Problem("FC101", "ReLU `act` cannot be part of a flow", "model.py:12")
>>> node = NodeReport("act", "call_module", "act (ReLU)", "rejected", None, "model.py:12", (8,), [problem])
>>> report = Report("MLP", [node])
>>> report.convertible, report.counts
(False, {'FC101': 1})
>>> print(report.nodes[0].hint)  # doctest: +ELLIPSIS
Replace nn.ReLU with nn.LeakyReLU(negative_slope=0.01) and fine-tune, or convert with relu="leaky" ...
"""

from __future__ import annotations

import json
import math
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from .errors import DIAGNOSTICS

__all__ = ["Problem", "Substitution", "NodeReport", "Report", "FOLLOW_ON_CODES"]

#: Codes that can be a mere consequence of a rejected producer (its value is then a tuple or unknown).
FOLLOW_ON_CODES = frozenset({"FC132", "FC304", "FC305", "FC306"})

CONVERTED, PASSTHROUGH, REJECTED = "converted", "passthrough", "rejected"


@dataclass(frozen=True)
class Problem:
    """One problem: stable ``code``, ``message`` (what happened) and ``location`` (``file:line``)."""

    code: str
    message: str
    location: str | None = None

    @property
    def title(self) -> str:
        diag = DIAGNOSTICS.get(self.code)
        return diag.title if diag else self.code

    @property
    def why(self) -> str:
        diag = DIAGNOSTICS.get(self.code)
        return diag.explanation if diag else ""

    @property
    def hint(self) -> str:
        diag = DIAGNOSTICS.get(self.code)
        return diag.hint if diag else ""

    def to_dict(self) -> dict[str, Any]:
        return dict(
            code=self.code, title=self.title, reason=self.message, why=self.why, hint=self.hint, location=self.location
        )


@dataclass(frozen=True)
class Substitution:
    """A node whose layer approximates the original operation (data, not text).

    ``original`` is what the model computes, ``replacement`` what the flow computes instead.
    """

    original: str
    replacement: str

    def __str__(self) -> str:
        return f"{self.original} replaced by {self.replacement}"


@dataclass
class NodeReport:
    """The fate of one graph node. ``code``/``reason``/``hint`` are those of its first problem."""

    name: str
    op: str
    target: str
    status: str
    likelihood: str | None = None
    node_location: str | None = None
    shape: tuple[int, ...] | None = None
    problems: list[Problem] = field(default_factory=list)
    #: what the conversion did beyond a plain flow layer (a substitution, a duplication)
    note: str | None = None
    #: True when the value has several consumers and is duplicated (an augmentation: a bound)
    fanout: bool = False
    #: set when the node's layer approximates the original operation (e.g. ReLU -> LeakyReLU)
    substitution: Substitution | None = None
    #: for a substituted node: max |substitute(v) - original(v)| on its original input v (example inputs)
    deviation: float | None = None
    #: for a substituted node: max |its value with every substitution - its original value|
    accumulated_deviation: float | None = None
    #: problems that only follow from the root problem of node ``caused_by`` (listed, not counted)
    follow_ons: list[Problem] = field(default_factory=list)
    caused_by: str | None = None

    def _first(self, attr: str) -> str | None:
        return getattr(self.problems[0], attr) if self.problems else None

    code = property(lambda self: self._first("code"), doc="The code of the first problem.")
    reason = property(lambda self: self._first("message"), doc="What happened (first problem).")
    why = property(lambda self: self._first("why"), doc="Why it blocks a flow (first problem).")
    hint = property(lambda self: self._first("hint"), doc="What to do (first problem).")

    @property
    def location(self) -> str | None:
        """``file:line`` of the first problem, else where the node was created."""
        if self.problems and self.problems[0].location:
            return self.problems[0].location
        return self.node_location

    def to_dict(self) -> dict[str, Any]:
        return dict(
            name=self.name,
            op=self.op,
            target=self.target,
            status=self.status,
            likelihood=self.likelihood,
            code=self.code,
            reason=self.reason,
            hint=self.hint,
            location=self.location,
            shape=list(self.shape) if self.shape is not None else None,
            problems=[p.to_dict() for p in self.problems],
            note=self.note,
            deviation=self.deviation,
            accumulated_deviation=self.accumulated_deviation,
            follow_ons=[p.to_dict() for p in self.follow_ons],
            caused_by=self.caused_by,
        )

    @property
    def full_note(self) -> str | None:
        """The note with the measured deviations of a substituted node."""
        if self.note is None or self.deviation is None:
            return self.note
        return (
            f"{self.note}; output deviation {self.deviation:.3g} here, "
            f"{self.accumulated_deviation:.3g} accumulated (example inputs)"
        )


@dataclass
class Report:
    """Result of :func:`flowconvert.audit`."""

    model: str
    nodes: list[NodeReport]
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    density_parameters: int = 0
    base: str = "diagonal"
    density: str = "gaussian"
    #: with substitutions (``relu="leaky"``): largest |flow output - original output| on the example inputs
    max_output_deviation: float | None = None
    #: whether the flow's densities had been fitted to data when this report was made (never at conversion)
    calibrated: bool = False

    # -- summary -----------------------------------------------------------------------
    @property
    def problems(self) -> list[tuple[NodeReport, Problem]]:
        """Every problem with the node it belongs to, in graph order."""
        return [(n, p) for n in self.nodes for p in n.problems]

    @property
    def convertible(self) -> bool:
        return not self.problems

    @property
    def exact(self) -> bool:
        """True when every converted layer is exact (a bound otherwise)."""
        return all(n.likelihood != "bound" and not n.fanout for n in self.nodes)

    @property
    def substitutions(self) -> list[NodeReport]:
        """Nodes whose layer approximates the original operation (e.g. ReLU -> LeakyReLU)."""
        return [n for n in self.nodes if n.substitution is not None]

    @property
    def likelihood(self) -> str:
        return "exact" if self.exact else "bound"

    @property
    def latent_size(self) -> int:
        return sum(math.prod(s) for s in self.output_shapes)

    @property
    def counts(self) -> dict[str, int]:
        """Problems per code, sorted by code."""
        return dict(sorted(Counter(p.code for _, p in self.problems).items()))

    @property
    def follow_ons(self) -> list[tuple[NodeReport, Problem]]:
        """Problems that only follow from a root problem (``NodeReport.caused_by``), listed but not counted."""
        return [(n, p) for n in self.nodes for p in n.follow_ons]

    def _headline(self) -> str:
        if self.convertible:
            return f"{self.model}: convertible, {self.likelihood} likelihood"
        n, k = len(self.problems), len(self.follow_ons)
        extra = f" (and {k} follow-on problem{'s' * (k != 1)} collapsed under their cause)" if k else ""
        return f"{self.model}: NOT convertible, {n} problem{'s' * (n != 1)}{extra}"

    def _summary_items(self) -> list[tuple[str, str]]:
        shapes = lambda ss: ", ".join(str(tuple(s)) for s in ss) or "-"
        verdict = "yes" if self.convertible else "no"
        lik = self.likelihood + (
            "" if self.exact else " (one-sample lower bound; deterministic log_prob is a point evaluation)"
        )
        converted = sum(n.status == CONVERTED for n in self.nodes)
        return (
            [
                ("convertible", verdict),
                ("likelihood", lik if self.convertible else lik + " if fixed"),
                ("flow layers", str(converted)),
                ("input shapes", shapes(self.input_shapes)),
                ("latent shapes", shapes(self.output_shapes)),
                ("latent size", str(self.latent_size)),
                (f"density parameters ({self.density} family, {self.base} base)", str(self.density_parameters)),
            ]
            + self._calibration_items()
            + self._substitution_items()
        )

    def _calibration_items(self) -> list[tuple[str, str]]:
        if self.calibrated or not self.density_parameters or not self.convertible:
            return []
        return [("densities", "uncalibrated: fit them with fc.calibrate(flow, data) before reading log_prob")]

    def _substitution_items(self) -> list[tuple[str, str]]:
        subs = self.substitutions
        if not subs:
            return []
        kinds = sorted({str(n.substitution) for n in subs})
        items = [
            (
                "substitutions",
                f"{len(subs)} node{'s' * (len(subs) != 1)}: {', '.join(kinds)} (outputs differ from the original)",
            )
        ]
        if self.max_output_deviation is not None:
            items.append(("max output deviation", f"{self.max_output_deviation:.3g} (on the example inputs)"))
        return items

    def _note_lines(self) -> list[str]:
        notes = [n for n in self.nodes if n.note]
        if not notes:
            return []
        return ["", "Notes:"] + [f"  {n.name}: {n.full_note}" for n in notes]

    # -- renderings ----------------------------------------------------------------------
    _COLUMNS = ("node", "op", "target", "status", "likelihood", "code", "location")

    def _rows(self) -> list[tuple[str, ...]]:
        return [
            (
                n.name,
                n.op,
                n.target,
                n.status,
                n.likelihood or "",
                ",".join(
                    [p.code for p in n.problems]
                    + ([f"({','.join(p.code for p in n.follow_ons)} after {n.caused_by})"] if n.follow_ons else [])
                ),
                n.location or "",
            )
            for n in self.nodes
        ]

    def __str__(self) -> str:
        lines = [f"flowconvert audit of {self._headline()}", ""]
        rows = [self._COLUMNS, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._COLUMNS))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        lines.append(fmt(rows[0]))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(fmt(r) for r in rows[1:])
        if self.problems:
            lines += ["", "Problems by kind:"]
            for code, count in self.counts.items():
                title = DIAGNOSTICS[code].title if code in DIAGNOSTICS else code
                lines.append(f"  {code}  {title}  x{count}")
            wrap = lambda label, text: textwrap.fill(
                text, 96, initial_indent=f"    {label:<6}", subsequent_indent=" " * 10
            )
            for node, p in self.problems:
                lines += [
                    "",
                    f"  [{p.code}] {p.title}: node `{node.name}` ({node.target})"
                    + (f" at {p.location}" if p.location else ""),
                ]
                lines.append(wrap("what:", p.message))
                lines.append(wrap("why:", p.why))
                lines.append(wrap("hint:", p.hint))
                if p is node.problems[0]:
                    after = [
                        f"{q.code} at `{m.name}`" for m in self.nodes if m.caused_by == node.name for q in m.follow_ons
                    ]
                    if after:
                        lines.append(
                            wrap("then:", "; ".join(after) + " (follow from this problem; they go away with it)")
                        )
        lines += self._note_lines()
        lines += ["", "Summary:"]
        items = self._summary_items()
        width = max(len(k) for k, _ in items)
        lines.extend(f"  {k.ljust(width)}  {v}" for k, v in items)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Report {self._headline()}>"

    def to_markdown(self) -> str:
        """The report as Markdown (summary, node table, problems)."""
        esc = lambda s: str(s).replace("|", "\\|")
        lines = [f"## flowconvert audit of {esc(self._headline())}", ""]
        lines.extend(f"- **{k}**: {esc(v)}" for k, v in self._summary_items())
        lines += ["", "| " + " | ".join(self._COLUMNS) + " |", "|" + "---|" * len(self._COLUMNS)]
        lines.extend(
            "| " + " | ".join(f"`{esc(c)}`" if i == 0 and c else esc(c) for i, c in enumerate(r)) + " |"
            for r in self._rows()
        )
        notes = [n for n in self.nodes if n.note]
        if notes:
            lines += ["", "### Notes", ""] + [f"- `{n.name}`: {esc(n.full_note)}" for n in notes]
        if self.problems:
            lines += ["", "### Problems", "", "| code | title | count |", "|---|---|---|"]
            lines.extend(
                f"| {c} | {esc(DIAGNOSTICS[c].title if c in DIAGNOSTICS else c)} | {k} |"
                for c, k in self.counts.items()
            )
            for node, p in self.problems:
                lines += [
                    "",
                    f"**{p.code}** {esc(p.title)}: node `{node.name}`" + (f" at `{p.location}`" if p.location else ""),
                    "",
                ]
                lines += [f"- what: {esc(p.message)}", f"- why: {esc(p.why)}", f"- hint: {esc(p.hint)}"]
                after = [
                    f"{q.code} at `{m.name}`" for m in self.nodes if m.caused_by == node.name for q in m.follow_ons
                ]
                if after and p is node.problems[0]:
                    lines.append(f"- then: {esc('; '.join(after))} (follow from this problem)")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary."""
        return dict(
            model=self.model,
            convertible=self.convertible,
            likelihood=self.likelihood,
            exact=self.exact,
            latent_size=self.latent_size,
            density_parameters=self.density_parameters,
            base=self.base,
            density=self.density,
            substitutions=[
                dict(
                    node=n.name,
                    note=n.note,
                    original=n.substitution.original,
                    replacement=n.substitution.replacement,
                    deviation=n.deviation,
                    accumulated_deviation=n.accumulated_deviation,
                )
                for n in self.substitutions
            ],
            max_output_deviation=self.max_output_deviation,
            calibrated=self.calibrated,
            input_shapes=[list(s) for s in self.input_shapes],
            output_shapes=[list(s) for s in self.output_shapes],
            problem_counts=self.counts,
            problems=[dict(node=n.name, **p.to_dict()) for n, p in self.problems],
            follow_on_problems=[dict(node=n.name, caused_by=n.caused_by, **p.to_dict()) for n, p in self.follow_ons],
            nodes=[n.to_dict() for n in self.nodes],
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
