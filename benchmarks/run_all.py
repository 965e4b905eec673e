"""Run every benchmark, one after the other, each in its own process; print one table.

    .venv/bin/python benchmarks/run_all.py            # the full suite (a few minutes)
    .venv/bin/python benchmarks/run_all.py --quick    # a smoke run (about a minute)
    .venv/bin/python benchmarks/run_all.py --only throughput latency
    .venv/bin/python benchmarks/run_all.py --compare benchmarks/results/<older>.json

Writes every figure to ``benchmarks/results/latest.json`` (and a timestamped copy next to
it). With ``--compare``, the table gets a column with each figure's ratio to its baseline
in the older results, for comparing runs made at different times (ratios, not raw values,
because the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import environment, format_table

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "bench_caller_cost",
    "bench_loop_lag",
    "bench_throughput",
    "bench_memory",
    "bench_rate_limited",
    "bench_latency",
    "bench_faults",
]
TIMEOUT_S = 240.0


def _run_script(name: str, quick: bool, extra: Sequence[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        command = [sys.executable, str(HERE / f"{name}.py"), "--json", str(out), *extra]
        if quick:
            command.append("--quick")
        start = time.perf_counter()
        try:
            completed = subprocess.run(command, timeout=TIMEOUT_S, check=False)
            code: int | str = completed.returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {TIMEOUT_S:g} s"
        wall = time.perf_counter() - start
        if code == 0 and out.exists():
            result: dict[str, Any] = json.loads(out.read_text())
        else:
            result = {"script": name, "figures": [], "error": f"exit status {code}"}
    result["wall_s"] = round(wall, 2)
    return result


def _short(script: str) -> str:
    return script.removeprefix("bench_")


def _old_ratios(path: Path | None) -> dict[tuple[str, str], float | None]:
    if path is None:
        return {}
    old = json.loads(path.read_text())
    ratios: dict[tuple[str, str], float | None] = {}
    for result in old.get("results", []):
        for figure in result.get("figures", []):
            ratios[(result["script"], figure["key"])] = figure.get("ratio")
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short smoke runs")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="run only these (e.g. throughput latency)"
    )
    parser.add_argument("--output", type=Path, default=HERE / "results" / "latest.json")
    parser.add_argument("--compare", type=Path, help="older results JSON to compare with")
    parser.add_argument(
        "--http-client",
        choices=("aiohttp", "builtin"),
        default="aiohttp",
        help="the library's HTTP client to measure (OpenPanel(http_client=...))",
    )
    args = parser.parse_args(argv)

    names = SCRIPTS
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}
        unknown = wanted - set(SCRIPTS)
        if unknown:
            parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
        names = [n for n in SCRIPTS if n in wanted]
    old = _old_ratios(args.compare)

    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    suite_start = time.perf_counter()
    results = []
    for name in names:
        print(f"\n### {name}{' --quick' if args.quick else ''}", flush=True)
        results.append(_run_script(name, args.quick, ["--http-client", args.http_client]))

    rows: list[dict[str, Any]] = []
    for result in results:
        for figure in result["figures"]:
            row = {**figure, "script": _short(result["script"])}
            if args.compare is not None:
                previous = old.get((result["script"], figure["key"]))
                row["label"] = (
                    f"{figure['label']} [was {previous:.2f}x]"
                    if previous is not None
                    else figure["label"]
                )
            rows.append(row)

    print("\n" + "=" * 100)
    print(
        f"All figures ({'quick' if args.quick else 'full'} run, {started}); ratio = value /"
        " baseline, both measured in the same run"
    )
    print("=" * 100)
    print(format_table(rows, with_script=True))

    goals = [r for r in rows if r["passed"] is not None]
    missed = [r for r in goals if not r["passed"]]
    print(f"\nGoals: {len(goals) - len(missed)} PASS, {len(missed)} MISS")
    for row in missed:
        print(
            f"  MISS  {row['script']}: {row['label']} = {row['value']:.4g} {row['unit']}"
            f" (goal {row['goal']})"
        )
    print("\nTime per script:")
    for result in results:
        status = result.get("error", "ok")
        print(f"  {_short(result['script']):<14} {result['wall_s']:>6.1f} s  {status}")
    total = time.perf_counter() - suite_start
    print(f"  {'total':<14} {total:>6.1f} s")

    document = {
        "started": started,
        "quick": args.quick,
        "total_s": round(total, 2),
        "environment": environment(),
        "goals": {"pass": len(goals) - len(missed), "miss": len(missed)},
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, default=str)
    args.output.write_text(text)
    stamp = started.replace(":", "").replace("-", "")
    copy = args.output.parent / f"run-{stamp}{'-quick' if args.quick else ''}.json"
    copy.write_text(text)
    print(f"\nWrote {args.output} and {copy}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
