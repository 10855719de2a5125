"""A parity report: each check with its numbers, inputs and provider, not just pass/fail."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Check:
    name: str
    passed: bool
    metrics: dict[str, float | int | str]
    inputs: str


@dataclass
class Report:
    folder: str
    source: str
    provider: str
    seed: int
    dtype: str
    tolerances: dict[str, float]
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def metrics(self) -> dict[str, dict[str, float | int | str]]:
        return {c.name: c.metrics for c in self.checks}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    def table(self) -> str:
        head = [
            f"verify {self.folder}",
            f"  source {self.source} · provider {self.provider} · dtype {self.dtype}"
            f" · seed {self.seed}",
            f"  tolerances {', '.join(f'{k} {v:g}' for k, v in self.tolerances.items())}",
        ]
        width = max(len(c.name) for c in self.checks) if self.checks else 0
        rows = []
        for c in self.checks:
            nums = "  ".join(f"{k}={_fmt(v)}" for k, v in c.metrics.items())
            rows.append(f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<{width}}  {nums}")
            rows.append(f"        {'':<{width}}  inputs: {c.inputs}")
        passed = sum(c.passed for c in self.checks)
        tail = (
            f"{'passed' if self.passed else 'FAILED'}: {passed} of {len(self.checks)} checks passed"
        )
        return "\n".join([*head, *rows, tail])


def _fmt(v: float | int | str) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
