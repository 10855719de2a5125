"""What `optimize` did: per fusion the matches applied and the matches refused, with reasons."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Fusion:
    name: str
    applied: int
    refused: list[str] = field(default_factory=list)


@dataclass
class Report:
    fusions: list[Fusion]
    nodes_before: int
    nodes_after: int
    max_diff: float | None = None  # before/after parity on generated inputs, when checked

    @property
    def applied(self) -> int:
        return sum(f.applied for f in self.fusions)

    def applied_by_fusion(self) -> dict[str, int]:
        return {f.name: f.applied for f in self.fusions}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, verbose: bool = False) -> str:
        width = max((len(f.name) for f in self.fusions), default=0)
        rows = [f"nodes {self.nodes_before} → {self.nodes_after}"]
        for f in self.fusions:
            rows.append(f"  {f.name:<{width}}  applied {f.applied}  refused {len(f.refused)}")
            if verbose:
                rows.extend(f"  {'':<{width}}    refused: {reason}" for reason in f.refused)
        if self.max_diff is not None:
            rows.append(f"parity before/after: max diff {self.max_diff:.3g}")
        return "\n".join(rows)
