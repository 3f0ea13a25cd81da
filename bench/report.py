"""The benchmark's one table: rows of (measure, before, after, goal, verdict), grouped by section."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    measure: str
    before: str = ""
    after: str = ""
    goal: str = ""
    verdict: str = ""  # "met", "MISSED", "" (information only)


def fmt(value, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "MISSED")


def render(sections: list[tuple[str, list[Row]]]) -> str:
    headers = ("measure", "before", "after", "goal", "")
    rows = [r for _, section in sections for r in section]
    widths = [max([len(headers[i])] + [len((r.measure, r.before, r.after, r.goal, r.verdict)[i]) for r in rows])
              for i in range(5)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [" | ".join(h.ljust(w) for h, w in zip(headers, widths)), line]
    for title, section in sections:
        out.append(f"[{title}]")
        for r in section:
            cells = (r.measure, r.before, r.after, r.goal, r.verdict)
            out.append(" | ".join(c.ljust(w) for c, w in zip(cells, widths)))
    return "\n".join(out)
