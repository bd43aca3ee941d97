"""Problems found while reading a COCO split, and the report that collects them.

Three severities:
- ``fatal``: training must not start (the user has to fix the data; the message says where and how);
- ``repaired``: the reader fixed it (clipped a box, dropped an annotation) and counts it;
- ``warning``: legal but suspicious (a category with no instances), reported only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["fatal", "repaired", "warning"]


@dataclass(frozen=True)
class Problem:
    """One finding about one file / record / field.

    Attributes:
        severity: "fatal", "repaired" or "warning".
        kind: stable short name of the check (e.g. "bbox_out_of_bounds"), used for counting and in tests.
        file: the annotation json (or image file) the problem is in.
        message: what is wrong, naming the id and field, and what was done or what to do.
    """

    severity: Severity
    kind: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass
class ValidationReport:
    """All problems of one split, in the order they were found."""

    problems: list[Problem] = field(default_factory=list)

    def add(self, severity: Severity, kind: str, file: str, message: str) -> None:
        """Record a problem."""
        self.problems.append(Problem(severity, kind, str(file), message))

    def of(self, severity: Severity) -> list[Problem]:
        """Problems of one severity."""
        return [p for p in self.problems if p.severity == severity]

    @property
    def fatal(self) -> list[Problem]:
        """Problems that must stop training."""
        return self.of("fatal")

    def kinds(self, severity: Severity | None = None) -> Counter[str]:
        """How many problems of each kind (optionally of one severity)."""
        return Counter(p.kind for p in self.problems if severity is None or p.severity == severity)

    def summary_lines(self, examples: int = 3) -> list[str]:
        """Human-readable lines: every fatal problem, then counts + a few examples per repaired/warning kind."""
        lines = [f"FATAL {p}" for p in self.fatal]
        for severity in ("repaired", "warning"):
            found = self.of(severity)  # type: ignore[arg-type]
            for kind, count in Counter(p.kind for p in found).items():
                first = [p for p in found if p.kind == kind][:examples]
                lines.append(f"{severity} {kind} x{count}, e.g. {first[0]}")
                lines.extend(f"    {p}" for p in first[1:])
        return lines


class DataValidationError(ValueError):
    """Raised before training when a split has fatal problems; the message lists each of them."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        listed = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"{len(problems)} fatal data problem(s); fix them and rerun "
            f"(`sam3-lora check-data ROOT` prints the full report):\n{listed}"
        )
