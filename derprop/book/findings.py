"""The sentences the book writes from numbers: which is largest, where one beats another, which way a curve goes.

Explained in the book chapter *Results at a glance*. A chapter never writes "most", "beat", "at no label count"
or "as κ grows" itself: it passes the numbers to a function here, and the function, which has unit tests on
constructed inputs (signs, ties, empty cases), chooses the words. Values are compared at the precision the
sentence shows them (``decimals``), so a sentence never calls two numbers different that it prints alike.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

MINUS = "\u2212"
"""The minus sign of printed numbers (a hyphen is not a minus)."""


def number(value: float, decimals: int = 2, *, sign: bool = False, thousands: bool = False) -> str:
    """``value`` with ``decimals`` decimals, a real minus sign, ``+`` in front of positive values when ``sign``,
    thousands separated when ``thousands``."""
    spec = ("+" if sign else "") + ("," if thousands else "") + f".{decimals}f"
    text = format(round(value, decimals) + 0.0, spec)  # + 0.0: no "-0.00"
    if sign and round(value, decimals) == 0:
        text = format(0.0, f".{decimals}f")
    return text.replace("-", MINUS)


def _cmp(a: float, b: float, decimals: int) -> int:
    """-1, 0 or 1: ``a`` against ``b`` as they print with ``decimals`` decimals."""
    ra, rb = round(a, decimals), round(b, decimals)
    return (ra > rb) - (ra < rb)


def join(words: Sequence[str], last: str = "and") -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    words = [str(w) for w in words]
    if len(words) <= 2:
        return f" {last} ".join(words)
    return ", ".join(words[:-1]) + f" {last} " + words[-1]


def how_many(n: int, total: int, noun: str) -> str:
    """``both seeds``, ``all three seeds``, ``2 of 3 seeds``, ``seed``-style counting of ``n`` of ``total``."""
    plural = noun if noun.endswith("s") else noun + "s"
    if n == total:
        return {1: f"the one {noun}", 2: f"both {plural}"}.get(total, f"all {_words(total)} {plural}")
    if n == 0:
        return f"no {noun}"
    return f"{n} of {total} {plural}"


def _words(n: int) -> str:
    return {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}.get(n, str(n))


def largest_change(effects: Mapping[str, float], *, what: str, unit: str = "points", decimals: int = 2) -> str:
    """Which of ``effects`` (name → signed change) changes ``what`` most, by absolute size: the sign says which
    way, the size which is largest. Effects that print alike at ``decimals`` tie.

    >>> largest_change({"a": -7.09, "b": -0.30}, what="the trained network")
    'a changes the trained network most: −7.09 points on average.'
    """
    if not effects:
        return f"No change of {what} was measured."
    top = max(abs(round(v, decimals)) for v in effects.values())
    leaders = [name for name, v in effects.items() if abs(round(v, decimals)) == top]
    if top == 0:
        return f"None changes {what}: every effect is {number(0, decimals)} {unit} at this precision."
    shown = join([f"{number(effects[n], decimals, sign=True)} ({n})" for n in leaders])
    if len(leaders) == 1:
        return f"{leaders[0]} changes {what} most: {number(effects[leaders[0]], decimals, sign=True)} {unit} on average."
    return f"{join(leaders)} change {what} equally most, by {shown} {unit} on average."


def beaten_at(cases: Mapping[Any, tuple[Sequence[float | None], Sequence[float | None]]], *, who: str, other: str,
              noun: str = "label count", unit: Callable[[Any], str] = lambda k: f"{k} labels",
              decimals: int = 1) -> str:
    """Where ``who`` beat ``other``: ``cases`` maps a case (a label count) to ``(who's values, other's values)``,
    one value per network (None: that network does not exist there). ``who`` beats ``other`` in a case when it is
    ahead on every network both have, at the printed precision; a tie is no win.

    >>> beaten_at({31: ((35.5, 35.0), (35.2, 33.4)), 62: ((38.9, 38.2), (41.0, 38.5))}, who="DerProp",
    ...           other="the baseline")
    'DerProp beat the baseline on every network at 31 labels (35.5 / 35.0 against 35.2 / 33.4), and at no other label count (62 labels: 38.9 / 38.2 against 41.0 / 38.5).'
    """
    def shown(values: Sequence[float | None]) -> str:
        return " / ".join("–" if v is None else number(v, decimals) for v in values)

    def detail(k: Any) -> str:
        ours, theirs = cases[k]
        return f"{shown(ours)} against {shown(theirs)}"

    wins = []
    for k, (ours, theirs) in cases.items():
        pairs = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None]
        if pairs and all(_cmp(a, b, decimals) > 0 for a, b in pairs):
            wins.append(k)
    rest = [k for k in cases if k not in wins]
    if not cases:
        return f"{who} was not compared with {other}."
    if not wins:
        return (f"{who} beat {other} at no {noun} ("
                + "; ".join(f"{unit(k)}: {detail(k)}" for k in rest) + ").")
    said = join([f"{unit(k)} ({detail(k)})" for k in wins])
    if not rest:
        return f"{who} beat {other} on every network at every {noun}: {said}."
    return (f"{who} beat {other} on every network at {said}, and at no other {noun} ("
            + "; ".join(f"{unit(k)}: {detail(k)}" for k in rest) + ").")


def above_on(first: str, second: str, pairs: Mapping[Any, tuple[float, float]], *, noun: str = "seed",
             what: str = "", decimals: int = 1, label: Callable[[Any], str] | None = None) -> str:
    """Where ``first`` is above ``second``: ``pairs`` maps a case (a seed) to ``(first's value, second's value)``.
    Names the cases where it is above, level (equal at ``decimals``) and below, with the values; ``label`` names
    a case in the details (default ``"<noun> <case>"``).

    >>> above_on("w/o DLP", "DerProp", {0: (50.3, 49.5), 1: (47.1, 45.8)})
    'w/o DLP is above DerProp on both seeds (seed 0: 50.3 against 49.5; seed 1: 47.1 against 45.8).'
    """
    if not pairs:
        return f"{first} and {second} were not compared."
    order = {k: _cmp(a, b, decimals) for k, (a, b) in pairs.items()}
    name = label or (lambda k: f"{noun} {k}")
    detail = "; ".join(f"{name(k)}: {number(a, decimals)} against {number(b, decimals)}" for k, (a, b) in pairs.items())
    subject = f"{first}{what}"
    above = [k for k, c in order.items() if c > 0]
    level = [k for k, c in order.items() if c == 0]
    below = [k for k, c in order.items() if c < 0]
    n = len(pairs)
    if len(above) == n:
        return f"{subject} is above {second} on {how_many(n, n, noun)} ({detail})."
    if len(below) == n:
        return f"{subject} is below {second} on {how_many(n, n, noun)} ({detail})."
    if len(level) == n:
        return f"{subject} is level with {second} on {how_many(n, n, noun)} ({detail})."
    parts = []
    for keys, word in ((above, "above"), (level, "level with"), (below, "below")):
        if keys:
            cases = join([str(k) for k in keys]) if label is None else join([name(k) for k in keys])
            parts.append(f"{word} {second} on {noun}{'s' if len(keys) > 1 else ''} {cases}" if label is None
                         else f"{word} {second} on {cases}")
    return f"{subject} is {join(parts, 'and')} ({detail})."


def trend(xs: Sequence[float], ys: Sequence[float], *, x_name: str, y_name: str, decimals: int = 0,
          thousands: bool = True) -> str:
    """Which way ``ys`` goes as ``xs`` grow: the two ends, whether it changes sign and where, and whether the
    way is monotone.

    >>> trend([0, 5, 20], [-900, -400, -20], x_name="κ", y_name="the net")
    'As κ grows from 0 to 20, the net rises from −900 to −20, and stays negative.'
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError("trend needs one y per x, at least one")
    pts = sorted(zip(xs, ys))
    fmt = lambda v: number(v, decimals, thousands=thousands)  # noqa: E731
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    if len(pts) == 1:
        return f"At {x_name} = {x0:g}, {y_name} is {fmt(y0)}."
    c = _cmp(y1, y0, decimals)
    steps = [_cmp(b, a, decimals) for (_, a), (_, b) in zip(pts, pts[1:])]
    monotone = all(s >= 0 for s in steps) or all(s <= 0 for s in steps)
    verb = {1: "rises", -1: "falls", 0: "ends where it starts"}[c]
    text = f"As {x_name} grows from {x0:g} to {x1:g}, {y_name} {verb}"
    text += f" from {fmt(y0)} to {fmt(y1)}" if c else f", at {fmt(y0)}"
    if not monotone:
        text += " (not monotonically)"
    signs = [(x, _cmp(y, 0, decimals)) for x, y in pts]
    if all(s < 0 for _, s in signs):
        return text + ", and stays negative."
    if all(s > 0 for _, s in signs):
        return text + ", and stays positive."
    first_positive = next((x for x, s in signs if s > 0), None)
    if signs[0][1] <= 0 and first_positive is not None:
        return text + f"; it is first positive at {x_name} = {first_positive:g}."
    first_negative = next((x for x, s in signs if s < 0), None)
    if signs[0][1] >= 0 and first_negative is not None:
        return text + f"; it is first negative at {x_name} = {first_negative:g}."
    return text + "."


def positive_from(points: Sequence[tuple[float, str, float]], *, unit: str = "per 1,000") -> str:
    """Where a net count is positive along ``points`` ``(extent in cells, name, net)``, sorted by extent: "from
    X cells on" only when every later point is positive too, else the points where it is, or "at no geometry"."""
    up = [k for k, (_, _, v) in enumerate(points) if v > 0]
    if not up:
        return "net negative at every geometry"
    shown = "; ".join(f"{points[k][1]}: {number(points[k][2], 1, sign=True)} {unit}" for k in up)
    if up == list(range(up[0], len(points))):
        first = points[up[0]]
        return f"net positive from {first[0]:.1f} cells on ({first[1]}: {number(first[2], 1, sign=True)} {unit})"
    cells = join([f"{points[k][0]:.1f}" for k in up])
    return f"net positive only at {cells} cells ({shown}), negative elsewhere"


def awareness(ratio: float) -> str:
    """How class-aware propagation weights are, from their own-class share as a multiple of the uniform share:
    below 1.1 "hardly", below 2 "only mildly", below 4 "moderately", else "strongly" class-aware."""
    for bound, words in ((1.1, "hardly class-aware"), (2.0, "only mildly class-aware"),
                         (4.0, "moderately class-aware")):
        if ratio < bound:
            return words
    return "strongly class-aware"


def criterion(margin: float, baseline: str, *, nets: str = "both networks") -> str:
    """This book's criterion for "semi-supervised training pays" in words, attributed: it is not the paper's."""
    return (f"this book's criterion, written down before the held-out seeds were trained (the paper states none): "
            f"at least {number(100 * margin, 0)} points above {baseline} on every held-out seed, for {nets}")


def verdict(claim: Mapping[str, Any]) -> str:
    """``**met**``, ``**not met**`` or ``not measured`` for a claim record (``measured``, ``met``)."""
    if not claim.get("measured"):
        return "not measured"
    return "**met**" if claim.get("met") is True else "**not met**"


def two_sources(what: str, build: float, build_source: str, committed_value: float, committed_source: str, *,
                unit: str = "%", decimals: int = 2) -> str:
    """One number that this build and the committed evidence both hold, side by side with their sources
    (Markdown), and their difference."""
    c = _cmp(build, committed_value, decimals)
    text = (f"{what}: {number(build, decimals)} {unit} in this build ({build_source}), "
            f"{number(committed_value, decimals)} {unit} in the committed evidence ({committed_source})")
    if c == 0:
        return text + ": the same to the digits shown."
    return text + f": {number(abs(build - committed_value), decimals)} points apart."


def noise_sentence(noise: Mapping[str, Any] | None, source: str | None = None) -> str:
    """What moves a CPU run besides the seed (``results/thread_noise.json``: the same warm start trained again at
    each thread count) beside the spread over seeds, as a sentence (Markdown); says so where it is not measured."""
    if not noise:
        return ("How far the same run moves between thread counts and machines is not measured in this checkout "
                "(`python -m experiments.thread_noise` writes `results/thread_noise.json`).")
    by = noise.get("by_threads") or {}
    repeat = max((v.get("range", 0.0) for v in by.values()), default=0.0)
    counts = sorted(by, key=lambda t: int(t))
    spread = noise.get("seed_spread") or {}
    text = (f"The same run, trained again with the same thread count, moves by {number(100 * repeat)} points; "
            f"between {join([f'{t} thread' + ('s' if t != '1' else '') for t in counts], 'and')} it moves by "
            f"{number(100 * noise.get('machine_range', 0.0))} points")
    if spread:
        text += (f", against a spread over seeds of {number(100 * spread['std'])} points (std; range "
                 f"{number(100 * spread['range'])})")
    return text + (f" ({source})." if source else ".")
